"""Building blocks shared by the models: masked linear and causal convolution layers, and the
channel-group (sub-pixel, R -> G -> B) masks. The layers keep no decoding state (see decode.py).

Every convolution here is a :class:`CausalConv2d`: a plain convolution with explicit
(top, bottom, left, right) zero padding and an optional fixed 0/1 mask on its weight. PixelCNN's
type A / B masks, the gated model's vertical and horizontal stacks and PixelCNN++'s down-shifted
convolutions are all instances (see the factories below), so one decoding cache serves them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedLinear(nn.Linear):
    """y = x (W * M)^T + b with a fixed 0/1 mask M [out, in].

    The mask is applied in ``forward``; the stored weights are never zeroed, so a weight
    masked now keeps training when ``set_mask`` later connects it (MADE's mask cycling).
    When every row of M connects a prefix of the inputs, of nondecreasing length down the rows
    (an autoregressive mask in its own order: the fully visible models, a MADE whose hidden units
    are sorted by degree), the product skips the masked-out half: see :func:`prefix_blocks`.
    """

    def __init__(self, in_features: int, out_features: int, mask: Tensor, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("mask", torch.empty(out_features, in_features), persistent=False)  # derived, not saved
        self.set_mask(mask)

    @classmethod
    def sharing(cls, layer: nn.Linear, mask: Tensor) -> MaskedLinear:
        """A masked view of ``layer``: the same weight and bias Parameters (trained together with
        it) under its own bool ``mask``, kept as given (MADE's ensemble members)."""
        with torch.device("meta"):
            view = cls(layer.in_features, layer.out_features, torch.ones(layer.out_features, layer.in_features),
                       bias=layer.bias is not None)
        view.weight, view.bias = layer.weight, layer.bias
        view.mask = mask.to(layer.weight.device)
        return view

    def set_mask(self, mask: Tensor) -> None:
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self.mask.copy_(mask)

    def masked_weight(self, rows: slice = slice(None)) -> Tensor:
        """W * M, or only its ``rows`` (what a decoder needs for one dimension's outputs)."""
        return self.weight[rows] * self.mask[rows]

    def blocks(self) -> list[tuple[int, int, int, int]] | None:
        """The current mask's :func:`prefix_blocks`, recomputed whenever the mask changes (``set_mask``
        writes it in place, which bumps its version counter)."""
        key = (self.mask._version, self.mask.data_ptr())
        if getattr(self, "_blocks_key", None) != key:
            self._blocks, self._blocks_key = prefix_blocks(self.mask), key
        return self._blocks

    def forward(self, x: Tensor) -> Tensor:
        blocks = self.blocks()
        if blocks is None:
            return F.linear(x, self.masked_weight(), self.bias)
        bias = self.bias if self.bias is not None else self.weight.new_zeros(self.out_features)
        flat, weight, mask = x.reshape(-1, self.in_features), self.weight, self.mask
        device = flat.device.type
        if torch.is_autocast_enabled(device):  # the blocks run in autocast's dtype, as F.linear would
            dtype = torch.get_autocast_dtype(device)
            flat, weight, mask, bias = (t.to(dtype) for t in (flat, weight, mask, bias))
        with torch.autocast(device, enabled=False):
            y = PrefixMaskedMatmul.apply(flat, weight, mask, bias, blocks)
        return y.view(*x.shape[:-1], -1)


def prefix_blocks(
    mask: Tensor, rows_per_block: int = 64, max_blocks: int = 16
) -> list[tuple[int, int, int, int]] | None:
    """Blocks (first row, end row, dense columns, columns) covering the ones of ``mask`` [out, in]
    when each row is a prefix of ones (row r: columns < n_r) with n_r nondecreasing; else None.

    The rows are cut into at most ``max_blocks`` runs of at least ``rows_per_block``. In a run, the
    columns its first row sees are all ones (``dense columns``, no mask needed); up to the columns
    its last row sees, a staircase of ones. For a triangular mask, G runs do (G + 1) / 2G of the
    dense work (about half) in 2G matrix products per pass.
    """
    lengths = mask.sum(1)
    if mask.numel() == 0 or bool((lengths.diff() < 0).any()):
        return None
    lengths = lengths.long()
    if not torch.equal(mask, (torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)).to(mask.dtype)):
        return None
    n = max(1, min(max_blocks, mask.shape[0] // rows_per_block))
    bounds = torch.linspace(0, mask.shape[0], n + 1).long().tolist()
    blocks = [(r0, r1, int(lengths[r0]), int(lengths[r1 - 1])) for r0, r1 in zip(bounds, bounds[1:], strict=False)]
    if sum((r1 - r0) * c for r0, r1, _, c in blocks) > 0.8 * mask.numel():
        return None  # little to skip: one dense product is faster
    return blocks


class PrefixMaskedMatmul(torch.autograd.Function):
    """x [B, in] (W * M)^T + b for a mask of :func:`prefix_blocks` ``blocks``. Each block of rows is
    a product over its dense columns with W as it is, plus one over its staircase columns with the
    masked W; the weight gradient is written block by block (and zeroed only beyond the blocks)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor, blocks: list) -> Tensor:
        stairs = [weight[r0:r1, d:c] * mask[r0:r1, d:c] for r0, r1, d, c in blocks]
        parts = []
        for (r0, r1, d, c), stair in zip(blocks, stairs, strict=True):
            y = torch.addmm(bias[r0:r1], x[:, :d], weight[r0:r1, :d].t()) if d else bias[r0:r1].repeat(len(x), 1)
            parts.append(y.addmm_(x[:, d:c], stair.t()) if c > d else y)
        ctx.save_for_backward(x, weight, mask, *stairs)
        ctx.blocks = blocks
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mask, *stairs = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        for (r0, r1, d, c), stair in zip(ctx.blocks, stairs, strict=True):
            g = grad[:, r0:r1]
            if need_x:
                grad_x[:, :d].addmm_(g, weight[r0:r1, :d])
                grad_x[:, d:c].addmm_(g, stair)
            if need_w:
                grad_w[r0:r1, :c].addmm_(g.t(), x[:, :c], beta=0)  # beta=0: the empty buffer is not read
                grad_w[r0:r1, d:c].mul_(mask[r0:r1, d:c])
                grad_w[r0:r1, c:].zero_()
        grad_b = grad.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, None, grad_b, None


def channel_groups(channels: int, groups: int) -> Tensor:
    """Group index of each channel when ``channels`` are split into ``groups`` contiguous parts."""
    return torch.arange(channels) * groups // channels


def channel_group_mask(in_channels: int, out_channels: int, groups: int, mask_type: str) -> Tensor:
    """[out, in] 0/1 mask for the current pixel: output group g sees input groups < g (type 'A')
    or <= g (type 'B'). With groups = 3 this is PixelCNN's sub-pixel R -> G -> B masking."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    out_group = channel_groups(out_channels, groups).unsqueeze(1)
    in_group = channel_groups(in_channels, groups).unsqueeze(0)
    allowed = in_group < out_group if mask_type == "A" else in_group <= out_group
    return allowed.float()


class CausalConv2d(nn.Conv2d):
    """Convolution with explicit zero padding ``(top, bottom, left, right)`` and a fixed weight mask.

    Output (i, j) reads padded input rows s*i .. s*i + kh - 1 and columns s*j .. s*j + kw - 1
    (stride s); a negative padding crops. ``scale`` is the resolution level of the input
    (0: full size, 1: halved, ...). ``exact_output``: pad a copy of x, so that the output is a whole
    tensor of its size, rather than pad inside the convolution and return a slice of a larger
    output (no copy of x); for an output modified in place or read by further convolutions, which
    would copy the slice (forward and backward).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        mask: Tensor | None = None,
        stride: int = 1,
        scale: int = 0,
        bias: bool = True,
        exact_output: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.causal_padding = tuple(padding)
        self.scale, self.exact_output = scale, exact_output
        self.register_buffer("mask", mask, persistent=False)  # derived from the arguments, not saved
        # a 1 x 1 convolution: its output at a place depends on its input there only
        self.pointwise = self.kernel_size == (1, 1) and stride == 1 and not any(self.causal_padding)

    def masked_weight(self) -> Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        if self.pointwise:
            return pointwise(x, self.masked_weight(), self.bias)
        top, bottom, left, right = self.causal_padding
        if 0 <= bottom <= top and 0 <= right <= left and not self.exact_output:
            # Pad symmetrically inside the convolution (no padded copy of x) and keep the leading
            # rows and columns: extra padding at the bottom / right only adds outputs at the end.
            out = F.conv2d(x, self.masked_weight(), self.bias, self.stride, padding=(top, left))
            s, (kh, kw) = self.stride[0], self.kernel_size
            rows = (x.shape[2] + top + bottom - kh) // s + 1
            cols = (x.shape[3] + left + right - kw) // s + 1
            return out[:, :, :rows, :cols]
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.masked_weight(), self.bias, self.stride)


def pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1 x 1 convolution, x [B, Cin, H, W] -> [B, Cout, H, W]. One pixel per image (cached
    decoding) is one plain matrix product; anything larger is oneDNN's convolution, which on
    channels-last inputs (the conv models' teacher-forced layout) is one matrix product over the
    positions, 1.3-2x faster forward and backward than a batched product per image."""
    B, C, H, W = x.shape
    if H * W == 1 and not torch.compiler.is_compiling():
        flat, matrix = x.reshape(B, C), weight.flatten(1).t()
        return (flat @ matrix if bias is None else torch.addmm(bias, flat, matrix)).view(B, -1, 1, 1)
    return F.conv2d(x, weight, bias)


class CausalConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 upsampling of a causal stream: output (r, c) = sum over taps (a, b) with
    r = 2 i' + a and c = 2 j' + b - crop_left of W[:, :, a, b] applied to input (i', j'); the result
    is cropped to the finer level's size. ``scale`` is the level of the (coarse) input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], crop_left: int,
                 scale: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=2)
        self.crop_left, self.scale = crop_left, scale

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, Cin, H', W'] -> [B, Cout, H, W] with (H, W) = ``size`` (the finer level's)."""
        out = super().forward(x)
        return out[:, :, : size[0], self.crop_left : self.crop_left + size[1]]


def pixelcnn_conv(in_channels: int, out_channels: int, kernel_size: int, mask_type: str, groups: int = 1):
    """PixelCNN's masked k x k convolution, stored as its non-zero (k//2 + 1) x k upper part:
    rows above in full, the current row left of the centre, and the centre by channel group."""
    k, r = kernel_size, kernel_size // 2
    mask = torch.ones(out_channels, in_channels, r + 1, k)
    mask[:, :, r, r + 1 :] = 0
    mask[:, :, r, r] = channel_group_mask(in_channels, out_channels, groups, mask_type)
    return CausalConv2d(in_channels, out_channels, (r + 1, k), (r, 0, r, r), mask)


def pointwise_conv(in_channels: int, out_channels: int, groups: int = 1, mask_type: str = "B"):
    """1 x 1 convolution; with groups > 1 it keeps the sub-pixel channel-group order."""
    mask = None if groups == 1 and mask_type == "B" else channel_group_mask(
        in_channels, out_channels, groups, mask_type
    ).view(out_channels, in_channels, 1, 1)
    return CausalConv2d(in_channels, out_channels, (1, 1), mask=mask)


def skew(x: Tensor) -> Tensor:
    """Shift row i of x [B, C, H, W] right by i -> [B, C, H, W + H - 1] (zeros elsewhere), so that
    the diagonals of x become columns: skew(x)[..., i, i + j] = x[..., i, j]."""
    B, C, H, W = x.shape
    return F.pad(x, (0, H)).flatten(2)[..., : H * (W + H - 1)].view(B, C, H, W + H - 1)


def unskew(x: Tensor) -> Tensor:
    """The inverse of :func:`skew`: [B, C, H, W + H - 1] -> [B, C, H, W]."""
    B, C, H, N = x.shape
    return F.pad(x.flatten(2), (0, H)).view(B, C, H, N + 1)[..., : N - H + 1]
