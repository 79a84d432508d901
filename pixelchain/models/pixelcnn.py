"""PixelCNN (van den Oord et al., 2016a) and Gated PixelCNN (van den Oord et al., 2016b).

PixelCNN: a type-A masked 7x7 convolution, residual blocks (1x1 -> masked 3x3 type B -> 1x1),
then ReLU -> 1x1 -> ReLU -> 1x1 to the head's parameters. Its masked kernels leave a blind spot
(pixels above-right of the receptive field's edge never reach a pixel).

Gated PixelCNN: a vertical stack (rows above and the current row, k wide) feeding, shifted down a
row, a horizontal stack (pixels to the left), with gated units tanh(a) * sigmoid(b), a residual
connection on the horizontal stack and skip connections to the head: no blind spot. Optional
class conditioning adds a learned per-class bias to every gate.

For C = 3 every convolution that sees the current pixel is split into channel groups (R, G, B):
the outputs for G see R, those for B see R and G (sub-pixel masking).

Cached decoding runs the same forward code on a single pixel (tensors [B, C]) and, for the
vertical stack, on a single row, its layers run through the decoder's caches (``run``), which
keep their inputs: a step costs one output position per layer, mostly one matrix product each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import DIRECT, ConvDecoder, Decoder, Run
from ..heads import default_head
from ..layers import CausalConv2d, channel_group_mask, pixelcnn_conv, pointwise_conv
from . import register
from .base import AutoregressiveModel, check_odd, check_sizes


# --------------------------------------------------------------------------- PixelCNN
class ResidualBlock(nn.Module):
    """x + 1x1(dropout(ReLU(masked kxk(ReLU(1x1(ReLU(x))))))), 2h -> h -> h -> 2h channels."""

    def __init__(self, channels: int, kernel_size: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.reduce = pointwise_conv(2 * channels, channels, groups)
        self.conv = pixelcnn_conv(channels, channels, kernel_size, "B", groups)
        self.expand = pointwise_conv(channels, 2 * channels, groups)
        self.dropout = dropout

    def forward(self, x: Tensor, run: Run = DIRECT) -> Tensor:
        h = run(self.conv, F.relu_(run(self.reduce, F.relu(x))))
        return run(self.expand, F.dropout(F.relu(h), self.dropout, self.training)).add_(x)


def readout(head_layers: nn.Sequential, h: Tensor, run: Run = DIRECT) -> Tensor:
    """The head layers (ReLU, 1x1, ReLU, 1x1, the ReLUs in place) on h, the convolutions through ``run``."""
    _, first, _, second = head_layers
    return run(second, F.relu_(run(first, F.relu_(h))))


@register("pixelcnn")
class PixelCNN(AutoregressiveModel):
    """PixelCNN: ``num_blocks`` residual blocks of ``channels`` (stream of 2 * channels);
    ``dropout``: the rate inside each block, in training (a regulariser: no parameters)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_levels: int = 2,
        channels: int = 16,
        num_blocks: int = 15,
        kernel_size: int = 3,
        input_kernel_size: int = 7,
        head_channels: int = 32,
        dropout: float = 0.0,
    ) -> None:
        check_sizes(channels=channels, num_blocks=num_blocks, kernel_size=kernel_size,
                    input_kernel_size=input_kernel_size, head_channels=head_channels)
        check_odd(kernel_size=kernel_size, input_kernel_size=input_kernel_size)
        super().__init__(image_shape, num_levels, default_head(num_levels))
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        C = self.image_shape[0]
        self.subpixel = C > 1
        self.input_conv = pixelcnn_conv(C, 2 * channels, input_kernel_size, "A", C)
        self.blocks = nn.ModuleList(ResidualBlock(channels, kernel_size, C, dropout) for _ in range(num_blocks))
        self.head_layers = nn.Sequential(
            nn.ReLU(inplace=True), pointwise_conv(2 * channels, head_channels, C),
            nn.ReLU(inplace=True), pointwise_conv(head_channels, self.param_channels, C),
        )

    def network(self, image: Tensor, run: Run = DIRECT) -> Tensor:
        """Input floats [B, C, H, W] in [-1, 1] -> head parameters [B, P, H, W]."""
        h = run(self.input_conv, image)
        for block in self.blocks:
            h = block(h, run)
        return readout(self.head_layers, h, run)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        # Channels last (also for C = 1, whose strides decide the convolutions' output layout):
        # every convolution after it runs on and returns that layout, oneDNN's fastest here.
        return self.network(self.image(x).to(memory_format=torch.channels_last))

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return ConvDecoder(self, x, labels, [self.input_conv])

    def pixel_params(self, decoder: ConvDecoder, h: int, w: int) -> Tensor:
        return self.network(decoder.pixel(h, w), decoder.caches.at(h, w))


# --------------------------------------------------------------------------- Gated PixelCNN
def gate(x: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) for x = [a, b] [B, 2h, H, W] split in half along channels -> [B, h, H, W]."""
    return Gate.apply(x)


class Gate(torch.autograd.Function):
    """The gated unit with tanh(a) = 2 sigmoid(2a) - 1 (torch.tanh took 9x sigmoid's time on the CPU
    here) and a backward of four elementwise passes written straight into the halves of one
    gradient (autograd's took six and a concatenation). Saves tanh(a) and sigmoid(b)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        t = torch.sigmoid_(a * 2).mul_(2).sub_(1)
        s = torch.sigmoid(b)
        ctx.save_for_backward(t, s)
        ctx.layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else (
            torch.contiguous_format)
        return t * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        t, s = ctx.saved_tensors
        B, h, H, W = t.shape
        out = torch.empty(B, 2 * h, H, W, dtype=t.dtype, device=t.device, memory_format=ctx.layout)
        grad_a, grad_b = out.chunk(2, dim=1)
        gs = grad * s
        gst = gs * t
        torch.addcmul(gs, gst, t, value=-1, out=grad_a)  # g s (1 - t^2)
        torch.addcmul(gst, gst, s, value=-1, out=grad_b)  # g t s (1 - s)
        return out


def down_shift(x: Tensor) -> Tensor:
    """Move every row down one (row 0 becomes zeros): [B, C, H, W] -> [B, C, H, W]."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    """One gated layer: vertical stack (k//2+1) x k, horizontal stack 1 x (k//2+1).

    The vertical pre-activation reaches the horizontal stack through a 1x1 ``link`` after a
    one-row down shift, so the horizontal stack at row i sees rows < i only through it.
    The first layer (``first``) masks the current pixel (type A) and has no residual; the last
    (``last``) feeds only the skip connections, so it has no horizontal output and no residual.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, groups: int,
                 first: bool, num_classes: int | None, last: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        k, r = kernel_size, kernel_size // 2
        self.first, self.last, self.dropout = first, last, dropout
        # exact outputs: the vertical pre-activation is zeroed in place and read by the link
        self.vertical_conv = CausalConv2d(in_channels, 2 * channels, (r + 1, k), (r, 0, r, r), exact_output=True)
        self.link = CausalConv2d(2 * channels, 2 * channels, (1, 1))
        # Horizontal kernel: pixels left of the current one, and the current one by channel group;
        # gate halves laid out chunk-major, each following the hidden channels' groups.
        mask = torch.ones(2 * channels, in_channels, 1, r + 1)
        mask[:, :, 0, r] = channel_group_mask(in_channels, channels, groups, "A" if first else "B").repeat(2, 1)
        self.horizontal_conv = CausalConv2d(in_channels, 2 * channels, (1, r + 1), (0, 0, r, 0), mask,
                                            exact_output=True)
        self.skip = pointwise_conv(channels, channels, groups)
        self.residual = None if first or last else pointwise_conv(channels, channels, groups)
        self.class_bias = None if num_classes is None else nn.Embedding(num_classes, 4 * channels)

    def add_class_bias(self, pre: Tensor, labels: Tensor, half: int) -> Tensor:
        """pre [B, 2h, ...] plus the labels' bias of the vertical (half 0) or horizontal (half 1) stack."""
        n = pre.shape[1]
        bias = self.class_bias(labels)[:, half * n : (half + 1) * n]
        return pre + bias.view(*bias.shape, *(1,) * (pre.dim() - 2))

    def vertical(self, v: Tensor, labels: Tensor | None, run: Run = DIRECT,
                 shifted: bool = False) -> tuple[Tensor, Tensor]:
        """Vertical input [B, Cin, H, W] -> (pre-activation [B, 2h, H, W], output [B, h, H, W]).

        ``shifted``: v is the input moved down a row (``down_shift``), and so are the results: row i
        is computed from v's rows up to i, row 0 set to zero (as down_shift leaves it). The vertical
        stack then runs a row down at no cost, and its last row, which no pixel reads, is never
        computed.
        """
        pre = run(self.vertical_conv, v)
        if self.class_bias is not None:
            pre = self.add_class_bias(pre, labels, 0)
        if shifted:
            pre[:, :, 0] = 0  # gate(0) = 0: the output's row 0 is zero too
        return pre, gate(pre)

    def horizontal(self, h: Tensor, shifted_vertical: Tensor, labels: Tensor | None,
                   run: Run = DIRECT) -> tuple[Tensor | None, Tensor]:
        """Horizontal input and the down-shifted vertical pre-activation -> (output, skip); the
        last layer's output is None (nothing reads it)."""
        pre = run(self.link, shifted_vertical).add_(run(self.horizontal_conv, h))
        if self.class_bias is not None:
            pre = self.add_class_bias(pre, labels, 1)
        g = gate(pre)
        if self.dropout and self.training:  # on what the residual and skip projections read
            g = F.dropout(g, self.dropout, True)
        if self.last:
            return None, run(self.skip, g)
        return (g if self.residual is None else run(self.residual, g).add_(h)), run(self.skip, g)


@register("gated_pixelcnn")
class GatedPixelCNN(AutoregressiveModel):
    """Gated PixelCNN: ``num_layers`` gated layers of ``channels`` after a 7x7 gated input layer.
    ``dropout``: the rate on each layer's gated horizontal output, in training (a regulariser: no
    parameters; evaluation and decoding are unchanged)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_levels: int = 2,
        channels: int = 64,
        num_layers: int = 10,
        kernel_size: int = 3,
        input_kernel_size: int = 7,
        head_channels: int = 64,
        num_classes: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        check_sizes(channels=channels, num_layers=num_layers, kernel_size=kernel_size,
                    input_kernel_size=input_kernel_size, head_channels=head_channels)
        check_odd(kernel_size=kernel_size, input_kernel_size=input_kernel_size)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__(image_shape, num_levels, default_head(num_levels), num_classes)
        C = self.image_shape[0]
        self.subpixel = C > 1
        self.layers = nn.ModuleList(
            [GatedLayer(C, channels, input_kernel_size, C, True, num_classes)]
            + [GatedLayer(channels, channels, kernel_size, C, False, num_classes, last=i == num_layers - 1,
                          dropout=dropout) for i in range(num_layers)]
        )
        self.head_layers = nn.Sequential(
            nn.ReLU(inplace=True), pointwise_conv(channels, head_channels, C),
            nn.ReLU(inplace=True), pointwise_conv(head_channels, self.param_channels, C),
        )

    def unused_weights(self) -> set[str]:
        """Weights that files written by earlier versions hold and this model lacks: the last
        layer's residual projection, which nothing read. Loading drops exactly these."""
        last = len(self.layers) - 1
        return {f"layers.{last}.residual.weight", f"layers.{last}.residual.bias"}

    def vertical_stack(self, image: Tensor, labels: Tensor | None, run: Run = DIRECT,
                       shifted: bool = False) -> Iterator[Tensor]:
        """Each layer's vertical pre-activation [B, 2h, H, W] in turn, a generator: the horizontal
        stack consumes them layer by layer, so they are not all held at once. ``shifted``: ``image``
        moved down a row, and so are the results (see :meth:`GatedLayer.vertical`)."""
        v = image
        for layer in self.layers:
            pre, v = layer.vertical(v, labels, run, shifted)
            yield pre

    def horizontal_stack(self, image: Tensor, shifted: Iterable[Tensor], labels: Tensor | None,
                         run: Run = DIRECT) -> Tensor:
        """Horizontal stack given the down-shifted vertical pre-activations -> params [B, P, H, W]."""
        h, skips = image, None
        for layer, vertical in zip(self.layers, shifted, strict=True):
            h, skip = layer.horizontal(h, vertical, labels, run)
            skips = skip if skips is None else skips.add_(skip)
        return readout(self.head_layers, skips, run)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        image = self.image(x).to(memory_format=torch.channels_last)  # see PixelCNN.forward
        # the vertical stack a row down (see GatedLayer.vertical), interleaved with the horizontal one
        return self.horizontal_stack(image, self.vertical_stack(down_shift(image), labels, shifted=True), labels)

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return ConvDecoder(self, x, labels, [self.layers[0].horizontal_conv])

    def pixel_params(self, decoder: ConvDecoder, h: int, w: int) -> Tensor:
        """The vertical stack once per row (on the complete row above), the horizontal stack at the
        pixel."""
        def vertical_above(previous: object) -> list[Tensor]:
            if h == 0:
                width = self.image_shape[2]
                return [decoder.x.new_zeros(len(decoder.x), layer.link.in_channels, 1, width, dtype=self.dtype)
                        for layer in self.layers]
            above = decoder.caches.at(h - 1, None)
            return list(self.vertical_stack(decoder.image_row(h - 1), decoder.labels, above))

        shifted = [pre[:, :, 0, w] for pre in decoder.per_row(h, vertical_above)]
        return self.horizontal_stack(decoder.pixel(h, w), shifted, decoder.labels, decoder.caches.at(h, w))
