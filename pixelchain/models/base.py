"""AutoregressiveModel: what every density model shares.

A subclass builds its network and implements ``forward(x, labels) -> params [B, P, H, W]``, the
teacher-forced parameters of every conditional in one pass; the head turns them into
log p(x_d | x_<d). The decoding hooks, all declared below: ``decoding_order`` (default: raster
order over pixels, channels R, G, B inside a pixel), ``decoder`` (default: the naive one); a
convolutional model decoding through ``decode.ConvDecoder`` gives ``image`` (its network's input),
``pixel_params`` (the network at one pixel) and ``subpixel``. Everything else (exact
log-likelihood, input checks, sampling, completion, the threads a call runs with) is here, once.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..decode import ConvDecoder, Decoder, KeepObserved, MostLikelyInWindow, NaiveDecoder, Policy, Sample, decode
from ..heads import Head
from ..masks import observed_like
from ..runtime import check_fits, intra_op_threads, threads_for
from ..score import eval_mode


def check_images(x: Tensor, image_shape: tuple[int, int, int], num_levels: int) -> Tensor:
    """Validate a batch of images and return it as int64; raise ValueError naming the problem."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        raise ValueError(
            f"x must hold integer levels in [0, {num_levels}), got dtype {x.dtype}; "
            "convert images with pixelchain.data (or x.round().long()) first"
        )
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"x must have shape [B, {', '.join(map(str, image_shape))}] "
            f"(batch, channels, height, width), got {list(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 images)")
    x = x.long()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_levels):
        raise ValueError(f"x values must lie in [0, {num_levels}), found [{int(x.min())}, {int(x.max())}]")
    return x


DECODE_BATCH = 256  # images decoded at once by sample / complete: bounds the decoders' memory


def is_integer(value: object) -> bool:
    """An int (numpy's too), not a bool or a float."""
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def check_sizes(**sizes: int | Sequence[int]) -> None:
    """Raise ValueError unless every size (an int, or a sequence of ints such as MADE's hidden
    layers) is a positive integer: the check every model constructor runs on its widths and depths."""
    for name, value in sizes.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values or not all(is_integer(v) and v >= 1 for v in values):
            raise ValueError(f"{name} must be a positive integer (or a list of them), got {value!r:.80}")


def check_eps(eps: int, num_levels: int | None = None) -> int:
    """A window radius / perturbation bound in levels: a whole number >= 0, else ValueError. Given
    the levels, one beyond num_levels - 1 is num_levels - 1: the same window (every level), in
    numbers every op can hold."""
    if (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or int(eps) != eps
            or eps < 0):
        raise ValueError(f"eps must be a whole number of levels >= 0, got {eps!r}")
    return int(eps) if num_levels is None else min(int(eps), num_levels - 1)


def check_odd(**sizes: int) -> None:
    """ValueError unless every size is odd: the kernels whose masks centre on the current pixel."""
    for name, value in sizes.items():
        if value % 2 == 0:
            raise ValueError(f"{name} must be odd (its mask centres on the current pixel), got {value}")


class RecordsInitArgs:
    """Records the constructor arguments of whatever is built, so pc.save can write a config
    that rebuilds it (``self.init_args``; the outermost ``__init__`` finishes last and wins)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            self.init_args = {k: v for k, v in list(bound.arguments.items())[1:]}

        cls.__init__ = recording_init


class AutoregressiveModel(RecordsInitArgs, nn.Module):
    """p(x) = prod_d p(x_d | x_<d) over the C*H*W dimensions of an image with K levels.

    Args:
        image_shape: (C, H, W).
        num_levels: K, the number of values of each dimension.
        head: the per-dimension likelihood.
        num_classes: if set, the model is class-conditional and takes ``labels`` [B] in
            [0, num_classes).
    """

    name = ""  # registry name, set by @register
    kind = "density"
    # The same weights run at every position (convolutions, attention, recurrences); False for the
    # dense models, whose every weight serves one dimension. Sizes the ops for ``op_work``.
    positional = True
    # Whether the network's outputs for a pixel depend on its own earlier channels (sub-pixel
    # masking): a ConvDecoder then recomputes a pixel's parameters for every channel.
    subpixel = False

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_levels: int,
        head: Head,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        if int(image_shape[0]) not in (1, 3):
            raise ValueError(f"image_shape must have 1 or 3 channels, got C={image_shape[0]}")
        if not is_integer(num_levels) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_levels = int(num_levels)
        self.head = head
        self.num_classes = num_classes

    # ----------------------------------------------------------------- shape helpers
    @property
    def num_dims(self) -> int:
        """D = C * H * W."""
        return math.prod(self.image_shape)

    @property
    def param_channels(self) -> int:
        """P, the number of head parameters per pixel."""
        return self.head.param_channels(self.image_shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def unit(self, x: Tensor) -> Tensor:
        """x in {0..K-1} -> floats in [0, 1], in the model's dtype."""
        return x.to(self.dtype) / (self.num_levels - 1)

    def image(self, x: Tensor) -> Tensor:
        """Levels [B, C, H, W] -> the network's input, by default floats in [-1, 1]."""
        return self.unit(x) * 2 - 1

    def op_work(self, batch: int, step: bool = False) -> float:
        """About how many multiply-adds one op of a forward pass on ``batch`` images does (or, with
        ``step``, of a cached decoding step): the parameters times the positions they serve,
        spread over the layers. What ``runtime.threads_for`` sizes the intra-op threads by."""
        params = sum(p.numel() for p in self.parameters())
        layers = sum(1 for m in self.modules() if next(m.parameters(recurse=False), None) is not None)
        positions = (1 if step else self.image_shape[1] * self.image_shape[2]) if self.positional else (
            1 / self.num_dims if step else 1)
        return batch * params * positions / max(1, layers)

    def raster(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> [B, D] in raster order (pixels, channels inside a pixel)."""
        return x.permute(0, 2, 3, 1).flatten(1)

    def unraster(self, params: Tensor) -> Tensor:
        """Per-dimension parameters [B, D, p] in raster order -> head layout [B, C * p, H, W]."""
        C, H, W = self.image_shape
        return params.view(len(params), H, W, C, -1).permute(0, 3, 4, 1, 2).reshape(len(params), -1, H, W)

    # ----------------------------------------------------------------- likelihood
    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Teacher-forced parameters of every conditional: x [B, C, H, W] -> [B, P, H, W]."""
        raise NotImplementedError

    def log_likelihood(self, params: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(x) [B] in nats from the output of ``forward`` (what training maximises)."""
        return self.head.log_prob(params, x).flatten(1).sum(1)

    def log_prob_map(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(x_d | x_<d) per dimension, in nats: x [B, C, H, W] -> [B, C, H, W]. Runs with the
        intra-op threads its work calls for (``runtime.threads_for``; restored afterwards)."""
        x, labels = self.check_input(x, labels)
        with intra_op_threads(threads_for(self.op_work(len(x)), "evaluate")):
            return self.head.log_prob(self(x, labels), x)

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact log p(x) in nats: x int64 [B, C, H, W] in [0, K) -> [B]."""
        log_probs = self.log_prob_map(x, labels)
        with intra_op_threads(threads_for(log_probs.numel())):
            return log_probs.flatten(1).sum(1)

    def bits_per_dim(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """-log2 p(x) / D: [B]."""
        return -self.log_prob(x, labels) / (self.num_dims * math.log(2))

    def check_input(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Validate a batch and return it as int64; raise ValueError naming the problem. Its few
        small reductions run at one intra-op thread (split over threads, each waited for a thread
        that another process had descheduled: milliseconds instead of microseconds on a busy machine)."""
        with intra_op_threads(1):
            return self._check_input(x, labels)

    def _check_input(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        x = check_images(x, self.image_shape, self.num_levels)
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels given to a model built without num_classes")
        else:
            if labels is None:
                raise ValueError(f"this model is class-conditional: pass labels [B] in [0, {self.num_classes})")
            labels = torch.as_tensor(labels, device=x.device)
            if labels.shape != (x.shape[0],) or labels.is_floating_point():
                raise ValueError(f"labels must be integers of shape [{x.shape[0]}], got {labels.dtype} "
                                 f"{list(labels.shape)}")
            labels = labels.long()
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes})")
        return x, labels

    # ----------------------------------------------------------------- decoding
    def decoding_order(self) -> list[tuple[int, int, int]]:
        """The order of the dimensions, as (c, h, w): raster over pixels, channels inside."""
        C, H, W = self.image_shape
        return [(c, h, w) for h in range(H) for w in range(W) for c in range(C)]

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        """The decoder ``sample`` and ``complete`` use; models override it with a cached one."""
        return NaiveDecoder(self, x, labels)

    @property
    def has_conditionals(self) -> bool:
        """Whether ``log_prob_map``, ``complete`` and ``purify`` are defined (a mixture of models in
        different orders has none that are tractable: MADE's order-agnostic ensemble)."""
        return True

    def naive_decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        """The reference decoder ``naive=True`` runs: a full forward pass per step."""
        return NaiveDecoder(self, x, labels)

    def pixel_params(self, decoder: ConvDecoder, h: int, w: int) -> Tensor:
        """For a ConvDecoder: the head's parameters at pixel (h, w), [B, P], computed through
        ``decoder.caches.at(...)`` (and ``decoder.per_row`` for work a row shares)."""
        raise NotImplementedError(f"{type(self).__name__} does not decode through a ConvDecoder")

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        labels: Tensor | None = None,
        naive: bool = False,
        progress: bool = False,
        batch_size: int | None = DECODE_BATCH,
    ) -> Tensor:
        """Draw n images: int64 [n, C, H, W], ``batch_size`` at a time (None: all at once), the
        decoders' memory bounded by the batch; ValueError if the n images cannot fit in memory.
        ``naive=True`` runs the reference decoder; a class-conditional model needs ``labels`` [n].
        ``temperature=0`` takes the most likely value at each step. Image i's draws come from the
        generator's stream in image order: with a CPU generator (the default one included) the
        same seed gives the same image i whatever ``batch_size`` and ``n`` (``decode.Sample``)."""
        if not is_integer(n) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        check_fits(n * self.num_dims * 8, f"{n} samples of {self.image_shape}", self.device)
        x = torch.zeros((), dtype=torch.long, device=self.device).expand(n, *self.image_shape)  # no memory
        _, labels = self.check_input(x, labels)
        Sample(generator, temperature)  # its checks, before any work
        policy_for = lambda i: Sample(generator, temperature, x[i])  # noqa: E731
        return self._decode_in_batches(x, labels, policy_for, batch_size, naive, progress)

    def complete(
        self,
        x: Tensor,
        observed: Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        labels: Tensor | None = None,
        naive: bool = False,
        progress: bool = False,
        batch_size: int | None = DECODE_BATCH,
    ) -> Tensor:
        """Keep x where ``observed`` (bool [B, C, H, W], or a shape that broadcasts to it: [H, W],
        [1, 1, H, W]) is True, sample the rest given it, ``batch_size`` images at a time (None: all
        at once); ``temperature=0``: the most likely values.

        Only dimensions before a missing one in the model's order condition it (the model is
        autoregressive); observed values later in the order are kept but do not inform it. In
        raster order, with the top missing, the bottom that is kept does not shape the top; when
        it matters use a model in another order (MADE with ``order_agnostic=True``, or flip the images).
        """
        x, labels = self.check_input(x, labels)
        observed = observed_like(observed, x)
        Sample(generator, temperature)  # its checks, before any work
        policy_for = lambda i: KeepObserved(x[i], observed[i], Sample(generator, temperature, x[i]))  # noqa: E731
        return self._decode_in_batches(x, labels, policy_for, batch_size, naive, progress)

    def _decode_in_batches(self, x: Tensor, labels: Tensor | None, policy_for: Callable[[slice], Policy],
                           batch_size: int | None, naive: bool, progress: bool) -> Tensor:
        """``decode`` the canvas ``x`` in consecutive slices i of ``batch_size`` with ``policy_for(i)``."""
        if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        step = len(x) if batch_size is None else batch_size
        out = torch.empty(x.shape, dtype=torch.long, device=x.device)  # written batch by batch
        with eval_mode(self):
            for start in range(0, len(x), step):
                i = slice(start, start + step)
                out[i] = decode(self, x[i], policy_for(i), None if labels is None else labels[i], naive=naive,
                                progress=progress)
        return out

    def purify(
        self,
        x: Tensor,
        eps: int,
        labels: Tensor | None = None,
        naive: bool = False,
        progress: bool = False,
        batch_size: int | None = DECODE_BATCH,
    ) -> Tensor:
        """PixelDefend: each dimension, in the model's order, set to its most likely value within
        ``eps`` levels of x's value, given the already purified dimensions: int64 [B, C, H, W],
        ``batch_size`` images at a time (None: all at once)."""
        x, labels = self.check_input(x, labels)
        eps = check_eps(eps, self.num_levels)
        if eps == 0:
            return x.clone()
        policy_for = lambda i: MostLikelyInWindow(x[i], eps)  # noqa: E731
        return self._decode_in_batches(x, labels, policy_for, batch_size, naive, progress)

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, num_levels={self.num_levels}, head={self.head.name}"
