"""PixelRNN (van den Oord et al., 2016): Row LSTM and Diagonal BiLSTM.

Both: a masked k x k convolution (type A) to a residual stream of 2h channels, ``num_layers`` LSTM
layers of h units, each added back to the stream through a 1 x 1 convolution, then
ReLU -> 1 x 1 -> ReLU -> 1 x 1 to the head's parameters. For C = 3 every masked layer splits its
channels into groups R, G, B, and each of the LSTM's 4 gate chunks is split like its hidden units,
so hidden group g at a pixel sees the input groups <= g there (sub-pixel order R -> G -> B).

* Row LSTM: rows top to bottom; gates = masked 1 x k convolution of the current row's input
  (for the whole map at once) + 1 x k convolution of the previous row's hidden state. Its
  receptive field is a triangle above the pixel, widening by k // 2 per row.
* Diagonal BiLSTM: two LSTMs along the diagonals (columns of the skewed map), each position from
  the states above and to its left (left to right) or right (right to left, run on the flipped
  map). The right-to-left output is shifted down one row, so it sees only rows above, and then
  it may read all of the row above: the layer input *and the pixels* (the layer input at a pixel
  never holds that pixel, so without them the last pixel of the row above would be a blind spot;
  the paper's version has it). With it, one layer sees every earlier pixel.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import ConvCache, Cursor, Decoder
from ..heads import default_head
from ..layers import (
    CausalConv2d,
    channel_group_mask,
    pixelcnn_conv,
    pointwise_conv,
)
from . import register
from .base import AutoregressiveModel, check_sizes


def lstm_cell(gates: Tensor, c: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """One LSTM step: gates with 4h entries along ``dim`` (chunks o, f, i, g), cell state c with h
    there -> (h, c)."""
    hidden = gates.shape[dim] // 4
    o, f, i = torch.sigmoid(gates.narrow(dim, 0, 3 * hidden)).chunk(3, dim=dim)
    c = f * c + i * torch.tanh(gates.narrow(dim, 3 * hidden, hidden))
    return o * torch.tanh(c), c


def input_to_state(channels: int, hidden: int, groups: int, width: int) -> CausalConv2d:
    """Masked 1 x width convolution to the 4h gates, ending at the current pixel: the pixels to its
    left in full, the pixel itself by channel group (type B), each gate chunk split like the units."""
    mask = torch.ones(4 * hidden, channels, 1, width)
    mask[:, :, 0, -1] = channel_group_mask(channels, hidden, groups, "B").repeat(4, 1)
    return CausalConv2d(channels, 4 * hidden, (1, width), (0, 0, width - 1, 0), mask)


@functools.cache
def diagonal_order(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """The pixels of an H x W map in diagonal order: by diagonal n = i + j, inside one from the top
    (the columns of the skewed map without its padding). Returns, for the map and for the map
    flipped left to right, the raster index of each position in that order [2, H W], its inverse
    [2, H W] (the position of each pixel), and the length of each diagonal."""
    i, j = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    order = torch.argsort((i + j) * height + i)
    index = torch.stack([order, i[order] * width + width - 1 - j[order]]).to(device)
    lengths = torch.bincount(i + j).tolist()
    return index, torch.argsort(index, dim=1), tuple(lengths)


def diagonal_step(gates: Tensor, left: Tensor, above: Tensor, c: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """One diagonal (or part of one) of D diagonal LSTMs: R positions, each from the hidden state to
    its left and the one above it (left and above [D, R, B, h]), the cell state to its left c
    [D, R, B, h] and its input-to-state gates [D, R, B, 4h]; weight [D, h, 8h]: the state-to-state
    weights from the left state (first 4h) and the one above (last 4h). Returns (h, c)."""
    D, R, B, G = gates.shape
    from_left, from_above = weight.split(G, 2)
    g = torch.baddbmm(gates.reshape(D, R * B, G), left.reshape(D, R * B, -1), from_left)
    g = torch.baddbmm(g, above.reshape(D, R * B, -1), from_above)
    return lstm_cell(g.view(D, R, B, G), c, dim=-1)


def diagonal_lstm(gates: Tensor, height: int, weight: Tensor, top: Tensor | None = None) -> Tensor:
    """D LSTMs side by side along the diagonals of H x W maps, one diagonal at a time, each in
    two matrix products for all D and the whole batch (:func:`diagonal_step`).

    gates [D, H W, B, 4h]: the input-to-state gates in :func:`diagonal_order`; top [D, W, B, h]: the
    hidden states above row 0 (zeros if None). Returns the hidden states [D, H W, B, h], same order.
    """
    D, P, B, G = gates.shape
    width = P // height
    zero = gates.new_zeros(D, 1, B, G // 4)
    tops = [zero] * width if top is None else list(top.split(1, 1))
    h = c = zero[:, :0]  # the previous diagonal, rows a .. b - 1
    a = b = 0
    hs = []
    for n, g in enumerate(gates.split(diagonal_order(height, width, gates.device)[2], 1)):
        lo, hi = max(0, n - width + 1), min(height, n + 1)  # this diagonal's rows
        # to the left: the previous diagonal's rows lo .. b - 1, and column -1 for a new row hi - 1 = b
        left, c = ((torch.cat([x[:, lo - a :], zero], 1) if hi > b else x[:, lo - a :]) for x in (h, c))
        above = torch.cat([tops[n], h[:, : hi - 1]], 1) if lo == 0 else h[:, lo - 1 - a : hi - 1 - a]
        h, c = diagonal_step(g, left, above, c, weight)
        hs.append(h)
        a, b = lo, hi
    return torch.cat(hs, 1)


class RowLSTMLayer(nn.Module):
    """An LSTM over rows, h units, on a residual stream of ``channels``."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        r = kernel_size // 2
        self.input_to_state = input_to_state(channels, hidden, groups, r + 1)
        self.state_to_state = CausalConv2d(hidden, 4 * hidden, (1, kernel_size), (0, 0, r, r), bias=False)
        self.out = pointwise_conv(hidden, channels, groups)

    def forward(self, z: Tensor, image: Tensor) -> Tensor:
        """z [B, channels, H, W] -> z + out(hidden states); ``image`` is unused (the Row LSTM sees
        the pixels through z alone)."""
        gates = self.input_to_state(z)
        h = c = z.new_zeros(len(z), gates.shape[1] // 4, 1, z.shape[3])
        rows = []
        for row in gates.split(1, 2):  # split, not indexing: one backward, not a full map per row
            h, c = lstm_cell(row + self.state_to_state(h), c)
            rows.append(h)
        return z + self.out(torch.cat(rows, 2))


class DiagonalBiLSTMLayer(nn.Module):
    """Left-to-right and right-to-left diagonal LSTMs, h units each, on a residual stream.

    The input is skewed once, without its padding: the positions gathered in diagonal order (the
    columns of the skewed map), for the map and for the map flipped left to right. Then the
    input-to-state 1 x 1 convolutions of both directions are one matrix product over all positions,
    and both directions run in one loop over the diagonals, two batched products per diagonal
    (:func:`diagonal_lstm`). Same parameters and function as the per-direction scan of the padded
    skewed map it replaced, ~2x faster to train on the CPU (BENCHMARKS.md).
    """

    def __init__(self, channels: int, hidden: int, groups: int) -> None:
        super().__init__()
        self.input_to_state = nn.ModuleList([
            input_to_state(channels, hidden, groups, 1),  # left to right: z at the pixel, masked
            nn.Conv2d(channels + groups, 4 * hidden, 1),  # right to left: z and the C = groups pixels
        ])
        self.state_to_state = nn.ModuleList(nn.Conv1d(hidden, 4 * hidden, 2, bias=False) for _ in range(2))
        self.out = pointwise_conv(hidden, channels, groups)

    def state_weight(self, directions: slice = slice(None)) -> Tensor:
        """[D, h, 8h]: the state-to-state weights of ``directions`` (0: left to right, 1: right to
        left) from the state to the left and the one above (the Conv1d taps: (above, left))."""
        w = torch.stack([conv.weight for conv in self.state_to_state[directions]])  # [D, 4h, h, 2]
        return torch.cat([w[..., 1], w[..., 0]], 1).transpose(1, 2)

    def scan(self, z: Tensor, image: Tensor, directions: slice = slice(None), top: Tensor | None = None) -> Tensor:
        """Hidden states [D, H, W, B, h] of ``directions`` (right to left: run on the flipped map,
        returned unflipped) from z [B, channels, H, W] and the pixels [B, C, H, W]; top [D, W, B, h]:
        the states above row 0, in each direction's column order (zeros if None)."""
        B, _, H, W = z.shape
        ltr, rtl = self.input_to_state
        C = rtl.in_channels - ltr.in_channels
        index, inverse, _ = diagonal_order(H, W, z.device)
        index, inverse = index[directions], inverse[directions]
        D, P = index.shape
        weight = torch.stack([F.pad(ltr.masked_weight().flatten(1), (0, C)), rtl.weight.flatten(1)])[directions]
        bias = torch.stack([ltr.bias, rtl.bias])[directions, None]
        # whole positions gathered (index_select: its backward adds rows, no scattered writes)
        x = torch.cat([z, image], 1).flatten(2).permute(2, 0, 1).index_select(0, index.flatten())
        gates = torch.baddbmm(bias, x.view(D, P * B, -1), weight.transpose(1, 2)).view(D, P, B, -1)
        h = diagonal_lstm(gates, H, self.state_weight(directions), top).flatten(0, 1)
        offsets = torch.arange(0, D * P, P, device=z.device)[:, None]
        return h.index_select(0, (inverse + offsets).flatten()).view(D, H, W, B, -1)

    def right_to_left(self, z: Tensor, image: Tensor, top: Tensor) -> Tensor:
        """The right-to-left hidden states [B, h, 1, W] of one row, not yet shifted, from its z
        [B, channels, 1, W], its pixels and the states of the row above, ``top`` [B, h, W]."""
        h = self.scan(z, image, slice(1, 2), top.flip(2).permute(2, 0, 1)[None])
        return h[0].permute(2, 3, 0, 1)

    def forward(self, z: Tensor, image: Tensor) -> Tensor:
        """z [B, channels, H, W], image [B, C, H, W] -> z + out(left + right shifted down a row)."""
        left, right = self.scan(z, image)  # [H, W, B, h] each
        right = F.pad(right, (0, 0, 0, 0, 0, 0, 1, 0))[:-1]  # (i, j) gets row i - 1
        return z + self.out((left + right).permute(2, 3, 0, 1))


class PixelRNN(AutoregressiveModel):
    """What both models share: the first masked convolution, the LSTM layers, the output layers."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int, channels: int) -> None:
        check_sizes(channels=channels)
        super().__init__(image_shape, num_levels, default_head(num_levels))
        C = self.image_shape[0]
        self.hidden = channels
        self.first = pixelcnn_conv(C, 2 * channels, 7, "A", groups=C)
        self.layers = nn.ModuleList()
        self.output = nn.Sequential(
            nn.ReLU(), pointwise_conv(2 * channels, 2 * channels, C),
            nn.ReLU(), pointwise_conv(2 * channels, self.param_channels, C),
        )

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        image = self.unit(x)
        z = self.first(image)
        for layer in self.layers:
            z = layer(z, image)
        return self.output(z)


@register("row_lstm")
class RowLSTM(PixelRNN):
    """Row LSTM: ``num_layers`` layers of ``channels`` units, 1 x ``kernel_size`` convolutions
    (defaults: the paper's binarized-MNIST size, h = 16 and 7 layers)."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int = 2, channels: int = 16,
                 num_layers: int = 7, kernel_size: int = 3) -> None:
        check_sizes(num_layers=num_layers, kernel_size=kernel_size)
        super().__init__(image_shape, num_levels, channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        C = self.image_shape[0]
        self.layers.extend(RowLSTMLayer(2 * channels, channels, kernel_size, C) for _ in range(num_layers))

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return RowLSTMDecoder(self, x, labels)


@register("diagonal_bilstm")
class DiagonalBiLSTM(PixelRNN):
    """Diagonal BiLSTM: ``num_layers`` layers of ``channels`` units per direction (defaults: the
    paper's binarized-MNIST model, h = 16 and 7 layers)."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int = 2, channels: int = 16,
                 num_layers: int = 7) -> None:
        check_sizes(num_layers=num_layers)
        super().__init__(image_shape, num_levels, channels)
        C = self.image_shape[0]
        self.layers.extend(DiagonalBiLSTMLayer(2 * channels, channels, C) for _ in range(num_layers))

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return DiagonalBiLSTMDecoder(self, x, labels)


# --------------------------------------------------------------------------- cached decoding
class PixelRNNDecoder(Decoder):
    """Per pixel, only that pixel's features: the first convolution at the pixel (a ConvCache of
    the canvas), one LSTM position per layer (``layer_at``), the 1 x 1 output layers.

    For C = 3 a pixel is visited once per channel and its states are recomputed each time; the
    states kept are those of the last visit (channel C - 1), when every other channel of the pixel
    is final, and no state of a pixel depends on its own last channel (type A first layer, type B
    after it), so they are the teacher-forced ones. Only the canvas itself changes after that: the
    first convolution's cache gets the pixel's final value when its last channel is final.
    """

    def __init__(self, model: PixelRNN, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        _, H, W = model.image_shape
        self.cursor = Cursor()
        self.first = ConvCache(model.first, self.cursor, len(x), H, W)
        self.pixel: tuple[int, int] | None = None

    def final(self, step: int, c: int, i: int, j: int) -> None:
        if c == self.x.shape[1] - 1:  # the pixel is complete
            self.first.store(i, j, self.model.unit(self.x[:, :, i, j]))

    def start_row(self, i: int) -> None:
        """Called when row i starts; rows above it are final."""

    def layer_at(self, n: int, layer: nn.Module, z: Tensor, i: int, j: int) -> Tensor:
        """Layer n's output [B, 2h, 1, 1] at pixel (i, j) from its input z there."""
        raise NotImplementedError

    def conditional(self, step: int, c: int, i: int, j: int) -> Tensor:
        model = self.model
        if self.pixel != (i, j):
            if self.pixel is None or self.pixel[0] != i:
                self.start_row(i)
            self.pixel = (i, j)
        self.cursor.i, self.cursor.j = i, j
        z = self.first(model.unit(self.x[:, :, i : i + 1, j : j + 1]))
        for n, layer in enumerate(model.layers):
            z = self.layer_at(n, layer, z, i, j)
        return model.head.conditional(model.output(z)[:, :, 0, 0], self.x[:, :, i, j], c)


class RowLSTMDecoder(PixelRNNDecoder):
    """Keeps each layer's previous row of states, its state-to-state gates computed once per row,
    and the current row's inputs (a ConvCache of the input-to-state convolution)."""

    def __init__(self, model: RowLSTM, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        _, H, W = model.image_shape
        self.caches = [ConvCache(layer.input_to_state, self.cursor, len(x), H, W) for layer in model.layers]
        zeros = self.first.buffer.new_zeros(len(x), model.hidden, 1, W)
        self.rows = [(zeros, zeros)] * len(model.layers)  # (h, c) of the current row per layer

    def start_row(self, i: int) -> None:
        layers = self.model.layers
        self.above = [(layer.state_to_state(h), c) for layer, (h, c) in zip(layers, self.rows, strict=True)]
        self.rows = [(torch.zeros_like(h), torch.zeros_like(c)) for h, c in self.rows]

    def layer_at(self, n: int, layer: RowLSTMLayer, z: Tensor, i: int, j: int) -> Tensor:
        gates_above, c_above = self.above[n]
        h, c = lstm_cell(self.caches[n](z) + gates_above[..., j : j + 1], c_above[..., j : j + 1])
        h_row, c_row = self.rows[n]
        h_row[..., j : j + 1], c_row[..., j : j + 1] = h, c
        return z + layer.out(h)


class DiagonalBiLSTMDecoder(PixelRNNDecoder):
    """Per pixel the left-to-right cell at (i, j) from the states at (i - 1, j) and (i, j - 1);
    when row i starts, the right-to-left states of the complete row i - 1 (from the states of
    row i - 2 above them), which, shifted down, serve all of row i."""

    def __init__(self, model: DiagonalBiLSTM, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        B, (_, H, W), h, L = len(x), model.image_shape, model.hidden, len(model.layers)
        new = self.first.buffer.new_zeros
        self.inputs = [new(B, 2 * h, 1, W) for _ in range(L)]  # the current row's layer inputs
        self.h = [new(B, H + 1, W + 1, h) for _ in range(L)]  # left to right, (i, j) at [i + 1, j + 1]
        self.c = [new(B, W + 1, h) for _ in range(L)]  # the current row's cell states, j at [j + 1]
        self.right = [new(B, h, 1, W) for _ in range(L)]  # right to left, the last complete row

    def start_row(self, i: int) -> None:
        if i:
            image = self.model.unit(self.x[:, :, i - 1 : i])
            self.right = [layer.right_to_left(z, image, top[:, :, 0])
                          for layer, z, top in zip(self.model.layers, self.inputs, self.right, strict=True)]

    def layer_at(self, n: int, layer: DiagonalBiLSTMLayer, z: Tensor, i: int, j: int) -> Tensor:
        self.inputs[n][..., j : j + 1] = z
        hs, cs = self.h[n], self.c[n]
        gates = layer.input_to_state[0](z).view(1, 1, len(z), -1)  # [D, R, B, 4h] = [1, 1, B, 4h]
        h, c = diagonal_step(gates, hs[None, None, :, i + 1, j], hs[None, None, :, i, j + 1],
                             cs[None, None, :, j], layer.state_weight(slice(0, 1)))
        hs[:, i + 1, j + 1], cs[:, j + 1] = h[0, 0], c[0, 0]
        return z + layer.out(h[0, 0, :, :, None, None] + self.right[n][..., j : j + 1])
