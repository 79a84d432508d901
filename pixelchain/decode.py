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
model code runs its spatial layers through a ``run`` argument (:data:`DIRECT` when teacher-forced).

The loop runs with the intra-op threads the per-step work calls for (``runtime.threads_for``): one
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
    """Draw each value from the conditional at ``temperature`` (uniforms from ``generator``).

    Any finite temperature > 0 works: the tempered logits are taken relative to their maximum (in
    float64), so a tiny temperature tends to the argmax instead of overflowing.

    The uniforms are the generator's float64 stream, B per step in order, drawn ``STEPS`` steps'
    worth at a time (one op per step instead of four): on CPU the values are those of a draw per
    step, and the same generator state gives the same samples; the generator ends further on than
    the draws used."""

    STEPS = 1024

    def __init__(self, generator: torch.Generator | None = None, temperature: float = 1.0) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.generator, self.temperature = generator, float(temperature)
        self.uniforms, self.used = torch.empty(0, 1, dtype=torch.float64), 0  # drawn [N, 1], and how many taken

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        if self.temperature != 1.0:
            log_probs = log_probs.double()
            log_probs = ((log_probs - log_probs.amax(dim=-1, keepdim=True)) / self.temperature).log_softmax(dim=-1)
        return inverse_cdf(log_probs, self.next_uniforms(len(log_probs), log_probs.device))

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
    with intra_op_threads(threads_for(model.op_work(len(x), step=not naive))):
        x = x.clone(memory_format=torch.contiguous_format)
        canvas = DimensionViews(x)
        decoder = NaiveDecoder(model, x, labels) if naive else model.decoder(x, labels)
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
    """Keeps a causal convolution's (padded) input and computes its output at the cursor only.

    A call with a pixel [B, Cin, 1, 1] (cursor (i, j)) or a row [B, Cin, 1, W] (cursor (i, None))
    stores it at that place and returns the layer's output there, [B, Cout, 1, 1] or
    [B, Cout, 1, W]: the work of one output position (or row) instead of the whole image.
    The cursor is in full-resolution coordinates; a layer at level s reads it as (i >> s, j >> s),
    and a stride-2 layer writes at its input's level and computes at the next one.
    """

    def __init__(self, conv: CausalConv2d, cursor: Cursor, batch: int, height: int, width: int) -> None:
        top, bottom, left, right = conv.causal_padding
        self.cursor = cursor
        self.top, self.left, self.stride = top, left, conv.stride[0]
        self.in_level, self.out_level = conv.scale, conv.scale + (self.stride == 2)
        self.kh, self.kw = conv.kernel_size
        weight = conv.masked_weight().detach()
        self.weight = weight
        # one [kw*Cin, Cout] matrix per kernel row, matching a buffer row's run of kw pixels
        self.matrices = weight.permute(2, 3, 1, 0).reshape(self.kh, -1, weight.shape[0]).unbind(0)
        self.bias = weight.new_zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()
        rows, cols = -(-height >> conv.scale), -(-width >> conv.scale)  # ceil(size / 2^scale)
        self.width = cols
        # Channels last, [B, rows, cols, Cin]: a window is kh*kw runs of Cin contiguous values.
        self.buffer = weight.new_zeros(batch, rows + top + bottom, cols + left + right, conv.in_channels)

    def store(self, i: int, j: int, value: Tensor) -> None:
        """Overwrite the kept input at (i, j) (input level) with ``value`` [B, Cin]."""
        if i + self.top < self.buffer.shape[1] and j + self.left < self.buffer.shape[2]:  # not cropped
            self.buffer[:, i + self.top, j + self.left] = value

    def __call__(self, x: Tensor) -> Tensor:
        i, j, s = self.cursor.i, self.cursor.j, self.stride
        r_in, r_out = i >> self.in_level, i >> self.out_level
        if j is None:  # a whole row
            if r_in + self.top < self.buffer.shape[1]:
                self.buffer[:, r_in + self.top, self.left : self.left + self.width] = x[:, :, 0].transpose(1, 2)
            rows = self.buffer[:, s * r_out : s * r_out + self.kh].permute(0, 3, 1, 2)
            return F.conv2d(rows, self.weight, self.bias, s)
        c_in, c_out = j >> self.in_level, j >> self.out_level
        self.store(r_in, c_in, x[:, :, 0, 0])
        # Kernel row a reads kw pixels of buffer row s*r_out + a: a [B, kw*Cin] view (no copy).
        rows = self.buffer[:, s * r_out : s * r_out + self.kh, s * c_out : s * c_out + self.kw].flatten(2)
        out = torch.addmm(self.bias, rows[:, 0], self.matrices[0])
        for a in range(1, self.kh):
            out.addmm_(rows[:, a], self.matrices[a])
        return out.view(x.shape[0], -1, 1, 1)


class UpsampleCache:
    """A :class:`CausalConvTranspose2d` at the cursor: a whole output row from the coarse row above
    it, or one output pixel from the coarse pixel whose single tap reaches it."""

    def __init__(self, up: CausalConvTranspose2d, cursor: Cursor) -> None:
        self.up, self.cursor = up, cursor

    def __call__(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        up, i, j = self.up, self.cursor.i, self.cursor.j
        fine = up.scale - 1
        r = i >> fine
        if j is None:  # x is coarse row r // 2: keep the output row of tap r % 2
            out = up(x, (r % 2 + 1, size[1]))
            return out[:, :, r % 2 : r % 2 + 1]
        if up.kernel_size[1] != 2 or up.crop_left:
            raise ValueError("pixel-by-pixel upsampling needs a 2x2 kernel without crop")
        c = j >> fine  # x is coarse pixel (r // 2, c // 2): one tap reaches (r, c)
        return (x[:, :, 0, 0] @ up.weight[:, :, r % 2, c % 2] + up.bias).view(len(x), -1, 1, 1)


Run = Callable[..., Tensor]


def DIRECT(layer: nn.Module, x: Tensor, *args) -> Tensor:  # noqa: N802 - a constant of the Run type
    """Run ``layer`` on ``x`` as it is: the teacher-forced pass (no decoding state)."""
    return layer(x, *args)


class LayerCaches:
    """The decoding state of a convolutional model: a cache for each of its spatial causal layers
    (1 x 1 convolutions need none), and the cursor they compute at. Called as ``run(layer, x)``
    by the model's code in place of ``layer(x)``."""

    def __init__(self, model: nn.Module, batch: int, height: int, width: int) -> None:
        self.cursor = Cursor()
        self.caches: dict[nn.Module, ConvCache | UpsampleCache] = {}
        for m in model.modules():
            if isinstance(m, CausalConv2d) and not m.pointwise:
                self.caches[m] = ConvCache(m, self.cursor, batch, height, width)
            elif isinstance(m, CausalConvTranspose2d):
                self.caches[m] = UpsampleCache(m, self.cursor)

    def at(self, i: int, j: int | None) -> LayerCaches:
        """Point the cursor at pixel (i, j), or at row i when j is None; returns self."""
        self.cursor.i, self.cursor.j = i, j
        return self

    def __call__(self, layer: nn.Module, x: Tensor, *args) -> Tensor:
        cache = self.caches.get(layer)
        return layer(x, *args) if cache is None else cache(x, *args)


class ConvDecoder(Decoder):
    """Cached decoding for causal convolutional models.

    The model's ``pixel_params(decoder, h, w)`` evaluates its network at one pixel through
    ``decoder.caches`` (whose layers keep their inputs) and ``decoder.per_row`` (work shared by a
    row). The convolutions in ``reads_image`` see the canvas directly: when a pixel is final its
    value is stored in them (during the pixel's own steps they held the not yet decided channels,
    which the masks ignore). A pixel's parameters are recomputed for every channel when the
    model is ``subpixel`` (the head's channels depend on the network's sub-pixel outputs).
    """

    def __init__(self, model, x: Tensor, labels: Tensor | None, reads_image: list[CausalConv2d]) -> None:
        super().__init__(model, x, labels)
        _, H, W = model.image_shape
        self.caches = LayerCaches(model, len(x), H, W)
        self.reads_image = [self.caches.caches[conv] for conv in reads_image]
        self.params: Tensor | None = None
        self.row, self.row_value = -1, None

    def image(self, rows: slice, cols: slice) -> Tensor:
        """The canvas at [rows, cols] as the network's input (``model.image``)."""
        return self.model.image(self.x[:, :, rows, cols])

    def per_row(self, h: int, compute: Callable[[], object]) -> object:
        """``compute()`` once for row h (the rows above are final), its result reused for the row."""
        if self.row != h:
            self.row, self.row_value = h, compute()
        return self.row_value

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        if self.params is None or self.model.subpixel:
            self.params = self.model.pixel_params(self, h, w)[:, :, 0, 0]
        return self.model.head.conditional(self.params, self.x[:, :, h, w], c)

    def final(self, step: int, c: int, h: int, w: int) -> None:
        if c == self.x.shape[1] - 1:  # the pixel is complete
            value = self.image(slice(h, h + 1), slice(w, w + 1))[:, :, 0, 0]
            for cache in self.reads_image:
                cache.store(h, w, value)
            self.params = None
