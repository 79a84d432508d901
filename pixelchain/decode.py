"""The one decoding loop, its policies, and the naive (reference) decoder.

Decoding visits the dimensions in the model's order. At each step a *decoder* gives the
conditional of the next dimension as log-probabilities [B, K]: the naive decoder by a full
forward pass of the canvas, a model's cached decoder from what it kept of earlier steps. A
*policy* then picks the value written into the canvas:

* :class:`Sample`: draw from the conditional (with a temperature) by inverse CDF of a uniform;
* :class:`KeepObserved`: completion: observed values stay, the others are drawn by a policy;
* :class:`MostLikelyInWindow`: PixelDefend purification: the most likely value within
  [x - eps, x + eps] of the input's value.

After the policy wrote a dimension's value the loop calls ``decoder.final``: the one place where a
decoder folds a final value into what it keeps. The decoding state of the convolutional models
lives here too (:class:`LayerCaches`, :class:`ConvDecoder`): their layers stay stateless, and the
model code runs its convolutions through a ``run`` argument (:data:`DIRECT` when teacher-forced;
at a pixel, on [B, C] tensors, each mostly one matrix product).

The loop runs with the intra-op threads the per-step work calls for (``runtime.THREADS``): one
thread for the small ops of a cached step, whose thread barriers stall whenever another process
holds a core; the caller's setting is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .heads import argmax_in_window, inverse_cdf
from .layers import CausalConv2d, CausalConvTranspose2d
from .runtime import intra_op_threads, threads_for

Policy = Callable[[Tensor, int, int, int], Tensor]


class Decoder:
    """Gives the conditional of each dimension in turn, reading earlier values from ``x``.

    ``x`` [B, C, H, W] is the canvas the decoding loop fills in place. ``conditional`` is called
    for steps 0, 1, 2, ... in the model's order; at step t the dimensions before t are final, and
    ``final`` was called for each of them once its value was written.
    """

    def __init__(self, model, x: Tensor, labels: Tensor | None = None) -> None:
        self.model, self.x, self.labels = model, x, labels

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        """log p(x[:, c, h, w] = v | earlier dimensions) for every v: [B, K]."""
        raise NotImplementedError

    def final(self, step: int, c: int, h: int, w: int) -> None:
        """Dimension (c, h, w), decoded at ``step``, now holds its final value in ``x``."""


class NaiveDecoder(Decoder):
    """The reference: one full teacher-forced forward pass of the canvas per step."""

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        params = self.model(self.x, self.labels)
        return self.model.head.conditional(params[:, :, h, w], self.x[:, :, h, w], c)


class DimensionViews:
    """The dimensions of x [B, C, H, W] as views x[:, c, h, w] [B] ([B, 1] with ``column``), split
    once (one op; indexing x costs four ops per step). x must be contiguous; writing a view writes x."""

    def __init__(self, x: Tensor, column: bool = False) -> None:
        self.height, self.width = x.shape[2], x.shape[3]
        self.views = x.view(len(x), -1, *([1] if column else [])).unbind(1)

    def __call__(self, c: int, h: int, w: int) -> Tensor:
        return self.views[(c * self.height + h) * self.width + w]


class Sample:
    """Draw each value from the conditional at ``temperature`` (uniforms from ``generator``);
    ``temperature=0``: the most likely value (greedy decoding).

    Any finite temperature > 0 works: the tempered logits are taken relative to their maximum (in
    float64), so a tiny temperature tends to the argmax instead of overflowing.

    Given the canvas ``like`` [B, C, H, W], image b draws its own C*H*W uniforms at once (one per
    dimension, laid out as the image): the generator's float64 stream, images in order. On a CPU
    generator an image's samples then depend on the seed and its index among all the images drawn,
    not on how they are split into batches (the CLI's generators are on the CPU). Without
    ``like`` the uniforms are the stream in decoding order, B per step, drawn ``STEPS`` steps'
    worth at a time (one op per step instead of four)."""

    STEPS = 1024

    def __init__(self, generator: torch.Generator | None = None, temperature: float = 1.0,
                 like: Tensor | None = None) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: the most likely value), got "
                             f"{temperature!r}")
        self.generator, self.temperature = generator, float(temperature)
        self.uniforms, self.used = torch.empty(0, 1, dtype=torch.float64), 0  # drawn [N, 1], and how many taken
        self.per_image = None
        if like is not None and self.temperature > 0:
            where = generator.device if generator is not None else like.device
            u = torch.rand(like.shape, generator=generator, device=where, dtype=torch.float64).to(like.device)
            _, _, self.height, self.width = like.shape
            # per dimension the B images' uniforms, contiguous [B, 1] (searchsorted copies strided ones)
            self.per_image = u.flatten(1).t().contiguous().unsqueeze(-1).unbind(0)

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        if self.temperature == 0:
            return log_probs.argmax(dim=-1)
        if self.temperature != 1.0:
            log_probs = log_probs.double()
            log_probs = ((log_probs - log_probs.amax(dim=-1, keepdim=True)) / self.temperature).log_softmax(dim=-1)
        if self.per_image is not None:
            u = self.per_image[(c * self.height + h) * self.width + w]
        else:
            u = self.next_uniforms(len(log_probs), log_probs.device)
        return inverse_cdf(log_probs, u)

    def next_uniforms(self, n: int, device: torch.device) -> Tensor:
        """The next n uniforms in [0, 1) of the generator's stream, float64 [n, 1] on ``device``."""
        if self.used + n > len(self.uniforms) or self.uniforms.device != device:
            where = self.generator.device if self.generator is not None else device
            fresh = torch.rand(n * self.STEPS, 1, generator=self.generator, device=where, dtype=torch.float64)
            self.uniforms, self.used = torch.cat([self.uniforms[self.used :].to(device), fresh.to(device)]), 0
        self.used += n
        return self.uniforms[self.used - n : self.used]


class KeepObserved:
    """Completion: where ``observed`` [B, C, H, W] is True keep ``x``'s value, else use ``fill``."""

    def __init__(self, x: Tensor, observed: Tensor, fill: Policy) -> None:
        with intra_op_threads(1):  # small ops (see runtime.PARALLEL_WORK)
            self.x, self.observed = DimensionViews(x.contiguous()), DimensionViews(observed.contiguous())
            self.all_observed = observed.all(dim=0).tolist()  # [c][h][w]: True where nothing is drawn
        self.fill = fill

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        if self.all_observed[c][h][w]:
            return self.x(c, h, w)
        return torch.where(self.observed(c, h, w), self.x(c, h, w), self.fill(log_probs, c, h, w))


class MostLikelyInWindow:
    """Purification: the most likely value within ``radius`` levels of ``x``'s value."""

    def __init__(self, x: Tensor, radius: int) -> None:
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        self.x, self.radius = DimensionViews(x.contiguous()), radius

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        return argmax_in_window(log_probs, self.x(c, h, w), self.radius)


@torch.no_grad()
def decode(
    model,
    x: Tensor,
    policy: Policy,
    labels: Tensor | None = None,
    naive: bool = False,
    progress: bool = False,
) -> Tensor:
    """Fill a copy of the canvas ``x`` [B, C, H, W] dimension by dimension in the model's order.

    The value of each dimension is ``policy(log_probs [B, K], c, h, w)`` where ``log_probs`` is
    its conditional given the values already decoded. ``naive=True`` runs a full forward pass per
    step (the reference); otherwise the model's cached decoder is used.
    """
    order = model.decoding_order()
    with intra_op_threads(threads_for(model.op_work(len(x), step=not naive), "evaluate" if naive else "decode")):
        x = x.clone(memory_format=torch.contiguous_format)
        canvas = DimensionViews(x)
        decoder = model.naive_decoder(x, labels) if naive else model.decoder(x, labels)
        for step, (c, h, w) in enumerate(tqdm(order, desc="decoding", unit="dim", disable=not progress)):
            canvas(c, h, w).copy_(policy(decoder.conditional(step, c, h, w), c, h, w))
            decoder.final(step, c, h, w)
    return x


# --------------------------------------------------------------------------- convolutional state
@dataclass
class Cursor:
    """Where cached decoding is: row ``i`` and column ``j``, or ``j = None`` for a whole row."""

    i: int = 0
    j: int | None = 0


class ConvCache:
    """Keeps a causal convolution's input and computes its output at the cursor only.

    The cursor is in full-resolution coordinates; a layer at level s reads it as (i >> s, j >> s),
    and a stride-2 layer writes at its input's level and computes at the next one.

    :meth:`pixel` (cursor (i, j)) takes the input at the cursor, [B, Cin], and returns the output
    there, [B, Cout]. It keeps a *window* per image, channels last, [B, columns, R, Cin]: for each
    padded input column the R padded input rows from the first one that the output row under the
    cursor reads (the kh it reads, and any written ahead for later output rows). When R = kh (a
    stride-1 layer whose kernel ends at the cursor's row) the kw columns an output reads are
    kw * kh * Cin consecutive values, and the output is one matrix product with the weight laid
    out as [kw * kh * Cin, Cout], the buffer read in place (the weight's trailing all-zero rows,
    masked taps, are left out). Otherwise those values are gathered first. When the output row
    changes the kept rows move up by the stride (one copy per row) and the rows that come in are
    zero until written: unwritten inputs read as zero padding, as they would in the full pass.

    :meth:`row` (cursor (i, None)) takes a whole input row [B, Cin, 1, W] and returns the output
    row [B, Cout, 1, W'] by a convolution over the kept padded rows [B, rows, columns, Cin].

    A layer runs pixel by pixel or row by row, not both. ``__call__`` runs either on 4-d tensors
    ([B, C, 1, 1] at a pixel).
    """

    def __init__(self, conv: CausalConv2d, cursor: Cursor, batch: int, height: int, width: int) -> None:
        top, bottom, left, right = conv.causal_padding
        if top < 0 or left < 0:
            raise ValueError(f"a cached causal convolution needs top and left padding >= 0, got {conv.causal_padding}")
        self.conv, self.cursor, self.batch = conv, cursor, batch
        self.top, self.bottom, self.left, self.right = top, bottom, left, right
        self.stride = s = conv.stride[0]
        self.in_level, self.out_level = conv.scale, conv.scale + (s == 2)
        self.kh, self.kw = kh, kw = conv.kernel_size
        weight = conv.masked_weight().detach()
        self.weight = weight
        self.bias = weight.new_zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()
        self.height, self.width = -(-height >> conv.scale), -(-width >> conv.scale)  # ceil(size / 2^scale)
        self.rows: Tensor | None = None  # the row-by-row buffer, made by the first row() call
        # Pixel by pixel. Input row r is written while the output row is r >> (s - 1), at slot
        # r + top - s * (r >> (s - 1)) <= top + s - 1.
        cin = conv.in_channels
        self.slots = R = max(kh, top + s)
        columns = left + self.width + max(right, 0)  # room for every input column, cropped or not
        self.buffer = weight.new_zeros(batch, columns, R, cin)
        self.cells = [[self.buffer[:, c, a] for c in range(columns)] for a in range(R)]  # [B, Cin] views
        matrix = weight.permute(3, 2, 1, 0).reshape(kw * kh * cin, -1)  # [kw, kh, Cin] -> Cout
        outputs = range((self.width + left + right - kw) // s + 1)
        self.contiguous = R == kh
        if self.contiguous:
            length = int(matrix.ne(0).any(1).nonzero().max()) + 1 if bool(matrix.ne(0).any()) else 0
            flat = self.buffer.view(batch, -1)
            self.windows = [flat[:, s * c * R * cin : s * c * R * cin + length] for c in outputs]
            matrix = matrix[:length]
        else:
            self.windows = [self.buffer[:, s * c : s * c + kw, :kh] for c in outputs]
        self.matrix = matrix.contiguous()
        self.row_index = 0  # the output row the window is at

    def advance(self, r_out: int) -> None:
        """Move the window to output row ``r_out`` (later than the current one)."""
        shift = self.stride * (r_out - self.row_index)
        if shift < 0:
            raise ValueError(f"cached decoding visits rows in order: row {r_out} after row {self.row_index}")
        keep = self.slots - shift
        if keep > 0:
            self.buffer[:, :, :keep] = self.buffer[:, :, shift:].clone()
        self.buffer[:, :, max(keep, 0) :] = 0
        self.row_index = r_out

    def pixel(self, x: Tensor) -> Tensor:
        """Store the input at the cursor, x [B, Cin]; return the output there, [B, Cout]."""
        i, j = self.cursor.i, self.cursor.j
        r_out = i >> self.out_level
        if r_out != self.row_index:
            self.advance(r_out)
        self.cells[(i >> self.in_level) + self.top - self.stride * r_out][(j >> self.in_level) + self.left].copy_(x)
        window = self.windows[j >> self.out_level]
        return torch.addmm(self.bias, window if self.contiguous else window.reshape(self.batch, -1), self.matrix)

    def row(self, x: Tensor) -> Tensor:
        """Store a whole input row x [B, Cin, 1, W] at the cursor's row; return the output row there."""
        s, r_in, r_out = self.stride, self.cursor.i >> self.in_level, self.cursor.i >> self.out_level
        if self.rows is None:
            self.rows = self.weight.new_zeros(self.batch, self.height + self.top + self.bottom,
                                              self.width + self.left + self.right, self.conv.in_channels)
        if r_in + self.top < self.rows.shape[1]:  # not cropped
            self.rows[:, r_in + self.top, self.left : self.left + self.width] = x[:, :, 0].transpose(1, 2)
        window = self.rows[:, s * r_out : s * r_out + self.kh].permute(0, 3, 1, 2)
        return F.conv2d(window, self.weight, self.bias, s)

    def store(self, i: int, j: int, value: Tensor) -> None:
        """Overwrite the kept input at (i, j) (input level, i in the cursor's row) with ``value`` [B, Cin]."""
        slot = i + self.top - self.stride * self.row_index
        if 0 <= slot < self.slots:
            self.cells[slot][j + self.left].copy_(value)
        if self.rows is not None and i + self.top < self.rows.shape[1] and j + self.left < self.rows.shape[2]:
            self.rows[:, i + self.top, j + self.left] = value

    def __call__(self, x: Tensor) -> Tensor:
        """:meth:`row` when the cursor is at a row, else :meth:`pixel` on x [B, Cin, 1, 1] -> [B, Cout, 1, 1]."""
        if self.cursor.j is None:
            return self.row(x)
        return self.pixel(x[:, :, 0, 0]).view(len(x), -1, 1, 1)


class UpsampleCache:
    """A :class:`CausalConvTranspose2d` at the cursor: a whole output row [B, Cout, 1, W] from the
    coarse row above it, or one output pixel [B, Cout] from the coarse pixel [B, Cin] whose single
    tap reaches it (a 2 x 2 kernel without crop: one matrix product)."""

    def __init__(self, up: CausalConvTranspose2d, cursor: Cursor) -> None:
        self.up, self.cursor = up, cursor
        weight = up.weight.detach()  # [Cin, Cout, kh, kw]
        self.bias = weight.new_zeros(weight.shape[1]) if up.bias is None else up.bias.detach()
        self.taps = None
        if up.kernel_size == (2, 2) and not up.crop_left:
            self.taps = [[weight[:, :, a, b].contiguous() for b in range(2)] for a in range(2)]

    def row(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x is coarse row r // 2 of fine row r: keep the output row of tap r % 2."""
        r = self.cursor.i >> (self.up.scale - 1)
        out = self.up(x, (r % 2 + 1, size[1]))
        return out[:, :, r % 2 : r % 2 + 1]

    def pixel(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, Cin] is coarse pixel (r // 2, c // 2) of fine pixel (r, c): one tap reaches (r, c)."""
        if self.taps is None:
            raise ValueError("pixel-by-pixel upsampling needs a 2x2 kernel without crop")
        fine = self.up.scale - 1
        return torch.addmm(self.bias, x, self.taps[(self.cursor.i >> fine) % 2][(self.cursor.j >> fine) % 2])


class PointwiseCache:
    """A 1 x 1 :class:`CausalConv2d` as one matrix product with its (masked) weight laid out once as
    [Cin, Cout]: at a pixel, or over a row's positions."""

    def __init__(self, conv: CausalConv2d) -> None:
        weight = conv.masked_weight().detach()
        self.matrix = weight.flatten(1).t().contiguous()
        self.bias = weight.new_zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()

    def pixel(self, x: Tensor) -> Tensor:
        """x [B, Cin] -> [B, Cout]."""
        return torch.addmm(self.bias, x, self.matrix)

    def row(self, x: Tensor) -> Tensor:
        """x [B, Cin, 1, W] -> [B, Cout, 1, W], channels last (a pixel's channels contiguous)."""
        B, C, _, W = x.shape
        out = torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(B * W, C), self.matrix)
        return out.view(B, 1, W, -1).permute(0, 3, 1, 2)


Run = Callable[..., Tensor]


def DIRECT(layer: nn.Module, x: Tensor, *args) -> Tensor:  # noqa: N802 - a constant of the Run type
    """Run ``layer`` on ``x`` as it is: the teacher-forced pass (no decoding state)."""
    return layer(x, *args)


class LayerCaches:
    """The decoding state of a convolutional model and the cursor it computes at; called as
    ``run(layer, x)`` by the model's code in place of ``layer(x)``.

    At a pixel (``at(i, j)``) the model's tensors are [B, C], one position per image, and at a row
    (``at(i, None)``) [B, C, 1, W]: every convolution (1 x 1 ones included) and upsampling runs
    through its cache's ``pixel`` or ``row``. Layers without a cache (activations, ...) run as they are.
    """

    def __init__(self, model: nn.Module, batch: int, height: int, width: int) -> None:
        self.cursor = Cursor()
        self.caches: dict[nn.Module, ConvCache | UpsampleCache] = {}
        self.pixel_ops: dict[nn.Module, Run] = {}
        self.row_ops: dict[nn.Module, Run] = {}
        for m in model.modules():
            if isinstance(m, CausalConv2d) and m.pointwise:
                cache = PointwiseCache(m)
            elif isinstance(m, CausalConv2d):
                cache = self.caches[m] = ConvCache(m, self.cursor, batch, height, width)
            elif isinstance(m, CausalConvTranspose2d):
                cache = self.caches[m] = UpsampleCache(m, self.cursor)
            else:
                continue
            self.pixel_ops[m], self.row_ops[m] = cache.pixel, cache.row
        self.ops = self.pixel_ops

    def at(self, i: int, j: int | None) -> LayerCaches:
        """Point the cursor at pixel (i, j), or at row i when j is None; returns self."""
        self.cursor.i, self.cursor.j = i, j
        self.ops = self.row_ops if j is None else self.pixel_ops
        return self

    def __call__(self, layer: nn.Module, x: Tensor, *args) -> Tensor:
        op = self.ops.get(layer)
        return layer(x, *args) if op is None else op(x, *args)


class ScaleReuse:
    """What a multi-scale network (PixelCNN++) recomputes at a pixel, and what it reuses.

    Level s runs at resolution 2^-s: sizes[s] = (ceil(H / 2^s), ceil(W / 2^s)). Its row h >> s is
    new only when 2^s divides h, and its place (h >> s, w >> s) only when 2^s divides h and w;
    otherwise the work there is the same as at the previous row or at the place's first pixel.
    ``places[s][column]`` keeps, for level s's current places, a result computed at a place's
    first pixel (for PixelCNN++ the ul stream's up-pass output: Fast PixelCNN++'s reuse).
    """

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        self.levels = len(sizes)
        self.places: list[list[Tensor | None]] = [[None] * width for _, width in sizes]

    def new_levels(self, *coordinates: int) -> int:
        """How many levels, from the finest, have new work at these full-resolution coordinates
        (the row h, or a place (h, w)): all of them at 0, else those s with 2^s dividing each."""
        bits = 0
        for value in coordinates:
            bits |= value
        return min((bits & -bits).bit_length() or self.levels, self.levels)

    def place(self, level: int, w: int) -> Tensor | None:
        """The result kept for level ``level``'s current place in full-resolution column w."""
        return self.places[level][w >> level]

    def keep(self, level: int, w: int, value: Tensor) -> None:
        self.places[level][w >> level] = value


class ConvDecoder(Decoder):
    """Cached decoding for causal convolutional models.

    The model's ``pixel_params(decoder, h, w)`` evaluates its network at one pixel through
    ``decoder.caches`` (whose layers keep their inputs), ``decoder.per_row`` (work shared by a
    row) and, for a multi-scale model (given ``sizes``), ``decoder.scales`` (a
    :class:`ScaleReuse`: work its coarser levels share between rows and pixels). The convolutions
    in ``reads_image`` see the canvas directly: when a pixel is final its value is stored in them
    (during the pixel's own steps they held the not yet decided channels, which the masks ignore).
    A pixel's parameters are recomputed for every channel when the model is ``subpixel`` (the
    head's channels depend on the network's sub-pixel outputs).

    The network's input of the canvas (``model.image``, which maps each pixel on its own) is
    computed once, [B, H, W, C'], and a pixel's is updated when its value changes: at its last
    channel, or at every channel when the model is ``subpixel``.
    """

    def __init__(self, model, x: Tensor, labels: Tensor | None, reads_image: list[CausalConv2d],
                 sizes: list[tuple[int, int]] | None = None) -> None:
        """``sizes``: a multi-scale model's size (rows, columns) at each level, finest first."""
        super().__init__(model, x, labels)
        _, H, W = model.image_shape
        self.caches = LayerCaches(model, len(x), H, W)
        self.reads_image = [self.caches.caches[conv] for conv in reads_image]
        self.inputs = model.image(x).permute(0, 2, 3, 1).contiguous()  # [B, H, W, C']
        self.levels = x.permute(0, 2, 3, 1).view(len(x), H * W, -1).unbind(1)  # pixel h * W + w of x: [B, C] views
        self.params: Tensor | None = None
        self.row, self.row_value = -1, None  # the row per_row last computed, and its result
        self.scales = None if sizes is None else ScaleReuse(sizes)

    def pixel(self, h: int, w: int) -> Tensor:
        """The canvas at pixel (h, w) as the network's input (``model.image``): [B, C']."""
        return self.inputs[:, h, w]

    def image_row(self, h: int) -> Tensor:
        """The canvas's row h as the network's input: [B, C', 1, W]."""
        return self.inputs[:, h : h + 1].permute(0, 3, 1, 2)

    def per_row(self, h: int, compute: Callable[[object], object]) -> object:
        """``compute(previous)`` once for row h (the rows above are final), its result reused for
        the row; ``previous`` is the previous row's result (None at the first row)."""
        if self.row != h:
            self.row, self.row_value = h, compute(self.row_value)
        return self.row_value

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        if self.params is None or self.model.subpixel:
            self.params = self.model.pixel_params(self, h, w)
        return self.model.head.conditional(self.params, self.levels[h * self.x.shape[3] + w], c)

    def final(self, step: int, c: int, h: int, w: int) -> None:
        complete = c == self.x.shape[1] - 1
        if complete or self.model.subpixel:
            value = self.inputs[:, h, w] = self.model.image(self.levels[h * self.x.shape[3] + w])
        if complete:
            for cache in self.reads_image:
                cache.store(h, w, value)
            self.params = None
