"""PixelCNN++ (Salimans et al., 2017).

Two streams: ``u`` sees the rows above (down-shifted 2x3 convolutions), ``ul`` the rows above and
the pixels to the left (down-right-shifted 2x2 convolutions). A down pass over ``num_scales``
resolutions (stride-2 convolutions between them) and an up pass back (stride-2 transposed
convolutions), with every down-pass output skip-connected to the up pass. Blocks are gated
ResNets with concat-ELU and dropout; the head is a discretised logistic mixture whose RGB
channels depend linearly on each other, so the network itself sees whole pixels only. With
``head="softmax"`` it is instead a free K-way softmax per sub-pixel (as PixelDefend's code has it),
whose RGB channels are independent given the pixels before (a normalised but factorised pixel).

Decoding with caches (Fast PixelCNN++, Ramachandran et al., 2017) uses this same code: the ``u``
stream runs one row per image row, the ``ul`` stream one pixel per pixel (tensors [B, C]), each
layer run through the decoder's caches (``run``) computing only the position at its own
resolution that the cursor points to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import DIRECT, ConvDecoder, Decoder, Run
from ..heads import Categorical, DiscretizedLogisticMixture
from ..layers import CausalConv2d, CausalConvTranspose2d
from . import register
from .base import AutoregressiveModel, check_sizes


def concat_elu(x: Tensor) -> Tensor:
    return F.elu(torch.cat([x, -x], dim=1))


def down_shifted(in_channels: int, out_channels: int, scale: int, stride: int = 1) -> CausalConv2d:
    """2x3 kernel over the row above and the current row, centred: sees rows <= i."""
    return CausalConv2d(in_channels, out_channels, (2, 3), (1, 0, 1, 1), stride=stride, scale=scale)


def down_right_shifted(in_channels: int, out_channels: int, scale: int, stride: int = 1) -> CausalConv2d:
    """2x2 kernel over rows i-1..i and columns j-1..j: sees pixels up to (i, j)."""
    return CausalConv2d(in_channels, out_channels, (2, 2), (1, 0, 1, 0), stride=stride, scale=scale)


class GatedResNet(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(concat_elu(aux)))))."""

    def __init__(self, channels: int, make_conv, scale: int, aux_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = make_conv(2 * channels, channels, scale)
        self.aux = CausalConv2d(2 * aux_channels, channels, (1, 1)) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = make_conv(2 * channels, 2 * channels, scale)

    def forward(self, x: Tensor, aux: Tensor | None = None, run: Run = DIRECT) -> Tensor:
        h = run(self.conv1, concat_elu(x))
        if aux is not None:
            h = h + run(self.aux, concat_elu(aux))
        h = concat_elu(h)
        if self.training:
            h = self.dropout(h)
        a, b = run(self.conv2, h).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


HEADS = ("mixture", "softmax")


@register("pixelcnn_pp")
class PixelCNNPP(AutoregressiveModel):
    """PixelCNN++ with ``channels`` filters, ``num_resnet`` blocks per scale and stream, and a
    mixture of ``num_mixtures`` discretised logistics (``head="mixture"``) or a K-way softmax per
    sub-pixel (``head="softmax"``; ``num_mixtures`` is then unused)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_levels: int = 256,
        channels: int = 64,
        num_resnet: int = 3,
        num_scales: int = 3,
        num_mixtures: int = 5,
        dropout: float = 0.5,
        head: str = "mixture",
    ) -> None:
        check_sizes(channels=channels, num_resnet=num_resnet, num_scales=num_scales, num_mixtures=num_mixtures)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r:.40}")
        mixture = head == "mixture"
        super().__init__(image_shape, num_levels,
                         DiscretizedLogisticMixture(num_levels, num_mixtures) if mixture else Categorical(num_levels))
        C, H, W = self.image_shape
        F_ = channels
        self.sizes = [(-(-H >> s), -(-W >> s)) for s in range(num_scales)]  # ceil(size / 2^s)
        inp = C + 1  # the image and a channel of ones, so zero padding differs from a zero pixel
        # u starts one row down, ul one row down (3 wide) plus one pixel right (2 tall).
        self.u_init = CausalConv2d(inp, F_, (2, 3), (2, -1, 1, 1))
        self.ul_init_up = CausalConv2d(inp, F_, (1, 3), (1, -1, 1, 1))
        self.ul_init_left = CausalConv2d(inp, F_, (2, 1), (1, 0, 1, -1))

        def blocks(make_conv, scale, n, aux):
            return nn.ModuleList(GatedResNet(F_, make_conv, scale, aux, dropout) for _ in range(n))

        S = num_scales
        self.u_down = nn.ModuleList(blocks(down_shifted, s, num_resnet, 0) for s in range(S))
        self.ul_down = nn.ModuleList(blocks(down_right_shifted, s, num_resnet, F_) for s in range(S))
        self.u_downsample = nn.ModuleList(down_shifted(F_, F_, s, stride=2) for s in range(S - 1))
        self.ul_downsample = nn.ModuleList(down_right_shifted(F_, F_, s, stride=2) for s in range(S - 1))
        # Up pass, coarsest scale first; finer scales have one more block (for the downsample skip).
        up_scales = list(reversed(range(S)))
        counts = [num_resnet] + [num_resnet + 1] * (S - 1)
        self.u_up = nn.ModuleList(blocks(down_shifted, s, n, F_) for s, n in zip(up_scales, counts, strict=True))
        self.ul_up = nn.ModuleList(
            blocks(down_right_shifted, s, n, 2 * F_) for s, n in zip(up_scales, counts, strict=True)
        )
        coarse = range(S - 1, 0, -1)  # upsampling from level s to s - 1
        self.u_upsample = nn.ModuleList(CausalConvTranspose2d(F_, F_, (2, 3), 1, s) for s in coarse)
        self.ul_upsample = nn.ModuleList(CausalConvTranspose2d(F_, F_, (2, 2), 0, s) for s in coarse)
        self.out = CausalConv2d(F_, self.param_channels, (1, 1))
        # The scale of each u block's output, in the order u_stream returns them.
        self.block_scales = [s for s in range(S) for _ in range(num_resnet)] + [
            s for s, n in zip(up_scales, counts, strict=True) for _ in range(n)
        ]

    def image(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] (int) -> network input [B, C + 1, H, W]: values in [-1, 1] and ones."""
        v = self.unit(x) * 2 - 1
        return torch.cat([v, torch.ones_like(v[:, :1])], dim=1)

    def u_stream(self, image: Tensor, run: Run = DIRECT, reuse: tuple[int, list[Tensor]] | None = None
                 ) -> list[Tensor]:
        """The u stream; returns the output of every u block, in block order. ``reuse`` = (level,
        outputs): the blocks at that level and the coarser ones are taken from ``outputs`` (an
        earlier call's whose rows there were the same), not computed."""
        levels = len(self.u_down) if reuse is None else reuse[0]
        u = run(self.u_init, image)
        skips, outputs = [u], []
        for s, scale in enumerate(self.u_down[:levels]):
            if s > 0:
                u = run(self.u_downsample[s - 1], u)
                skips.append(u)
            for block in scale:
                u = block(u, None, run)
                skips.append(u)
                outputs.append(u)
        if reuse is None:
            skips.pop()  # the coarsest block's output goes on up
        else:  # the reused levels' down blocks, then their up blocks, whose last output goes on up
            run(self.u_downsample[levels - 1], u)  # keeps its input row, which later rows read
            down = sum(len(scale) for scale in self.u_down)
            up = sum(len(scale) for scale in self.u_up[: len(self.u_up) - levels])
            outputs += reuse[1][len(outputs) : down + up]
            u = outputs[-1]
        for s, scale in enumerate(self.u_up):
            level = len(self.u_up) - 1 - s
            if level >= levels:
                continue
            if s > 0:
                u = run(self.u_upsample[s - 1], u, self.sizes[level])
            for block in scale:
                u = block(u, skips.pop(), run)
                outputs.append(u)
        return outputs

    def ul_stream(self, image: Tensor, u_outputs: list[Tensor], run: Run = DIRECT,
                  reuse: tuple[int, Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """The ul stream, given the u blocks' outputs at the same places -> (params [B, P, H, W], the
        up pass's output at each level it computed, coarsest first). ``reuse`` = (level, output):
        that level and the coarser ones are not computed, ``output`` stands for the up pass's
        output at that level (an earlier call's at the same place), and ``u_outputs`` holds the
        finer levels' only."""
        levels = len(self.ul_down) if reuse is None else reuse[0]
        ul = run(self.ul_init_up, image) + run(self.ul_init_left, image)
        skips, u, ups = [ul], iter(u_outputs), []
        for s, scale in enumerate(self.ul_down[:levels]):
            if s > 0:
                ul = run(self.ul_downsample[s - 1], ul)
                skips.append(ul)
            for block in scale:
                ul = block(ul, next(u), run)
                skips.append(ul)
        if reuse is None:
            skips.pop()  # the coarsest block's output goes on up
        else:
            run(self.ul_downsample[levels - 1], ul)  # keeps its input, which later places read
            ul = reuse[1]
        for s, scale in enumerate(self.ul_up):
            level = len(self.ul_up) - 1 - s
            if level >= levels:
                continue
            if s > 0:
                ul = run(self.ul_upsample[s - 1], ul, self.sizes[level])
            for block in scale:
                ul = block(ul, torch.cat([next(u), skips.pop()], dim=1), run)
            ups.append(ul)
        return run(self.out, F.elu(ul)), ups

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        image = self.image(x)
        return self.ul_stream(image, self.u_stream(image))[0]

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return ConvDecoder(self, x, labels, [self.u_init, self.ul_init_up, self.ul_init_left], self.sizes)

    def pixel_params(self, decoder: ConvDecoder, h: int, w: int) -> Tensor:
        """The u stream once per row (every scale's row under the cursor), the ul stream at the pixel.

        ``decoder.scales`` says which levels are new: the u stream computes the levels whose row is
        new and reuses the previous row's coarser ones; the ul stream computes the levels whose
        place is new (its inputs are final at the place's first pixel) and keeps their up pass's
        outputs there, which the place's other pixels reuse (Fast PixelCNN++)."""
        scales = decoder.scales

        def u_rows(previous) -> tuple[list[Tensor], list[tuple[Tensor, ...]]]:  # and each row column by column
            fresh = scales.new_levels(h)
            reuse = (fresh, previous[0]) if fresh < scales.levels else None
            outputs = self.u_stream(decoder.image_row(h), decoder.caches.at(h, None), reuse)
            return outputs, [u[:, :, 0].unbind(2) for u in outputs]

        columns = decoder.per_row(h, u_rows)[1]
        fresh = scales.new_levels(h, w)
        reuse = (fresh, scales.place(fresh, w)) if fresh < scales.levels else None
        u_here = [u[w >> s] for u, s in zip(columns, self.block_scales, strict=True) if s < fresh]
        params, new = self.ul_stream(decoder.pixel(h, w), u_here, decoder.caches.at(h, w), reuse)
        for s, up in zip(range(fresh - 1, 0, -1), new, strict=False):  # coarsest first; level 0 is not reused
            scales.keep(s, w, up)
        return params
