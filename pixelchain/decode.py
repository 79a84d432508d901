"""The one decoding loop, its policies, and the naive (reference) decoder.

Decoding visits the dimensions in the model's order. At each step a *decoder* gives the
conditional of the next dimension as log-probabilities [B, K]: the naive decoder by a full
forward pass of the canvas, a model's cached decoder from what it kept of earlier steps. A
*policy* then picks the value written into the canvas:

* :class:`Sample`: draw from the conditional (with a temperature) by inverse CDF of a uniform;
* :class:`KeepObserved`: completion: observed values stay, the others are drawn by a policy;
* :class:`MostLikelyInWindow`: PixelDefend purification: the most likely value within
  [x - eps, x + eps] of the input's value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .heads import argmax_in_window, sample_inverse_cdf

Policy = Callable[[Tensor, int, int, int], Tensor]


class Decoder:
    """Gives the conditional of each dimension in turn, reading earlier values from ``x``.

    ``x`` [B, C, H, W] is the canvas the decoding loop fills in place. ``conditional`` is called
    for steps 0, 1, 2, ... in the model's order; at step t the dimensions before t are final.
    """

    def __init__(self, model, x: Tensor, labels: Tensor | None = None) -> None:
        self.model, self.x, self.labels = model, x, labels

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        """log p(x[:, c, h, w] = v | earlier dimensions) for every v: [B, K]."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the decoder attached to the model (caches); called when decoding ends."""

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NaiveDecoder(Decoder):
    """The reference: one full teacher-forced forward pass of the canvas per step."""

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        params = self.model(self.x, self.labels)
        return self.model.head.conditional(params[:, :, h, w], self.x[:, :, h, w], c)


class Sample:
    """Draw each value from the conditional at ``temperature`` (uniforms from ``generator``).

    Any finite temperature > 0 works: the tempered logits are taken relative to their maximum (in
    float64), so a tiny temperature tends to the argmax instead of overflowing."""

    def __init__(self, generator: torch.Generator | None = None, temperature: float = 1.0) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.generator, self.temperature = generator, float(temperature)

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        if self.temperature != 1.0:
            log_probs = log_probs.double()
            log_probs = ((log_probs - log_probs.amax(dim=-1, keepdim=True)) / self.temperature).log_softmax(dim=-1)
        device = self.generator.device if self.generator is not None else log_probs.device
        uniform = torch.rand(log_probs.shape[0], generator=self.generator, device=device, dtype=torch.float64)
        return sample_inverse_cdf(log_probs, uniform.to(log_probs.device))


class KeepObserved:
    """Completion: where ``observed`` [B, C, H, W] is True keep ``x``'s value, else use ``fill``."""

    def __init__(self, x: Tensor, observed: Tensor, fill: Policy) -> None:
        self.x, self.observed, self.fill = x, observed, fill

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        keep = self.observed[:, c, h, w]
        if bool(keep.all()):
            return self.x[:, c, h, w]
        return torch.where(keep, self.x[:, c, h, w], self.fill(log_probs, c, h, w))


class MostLikelyInWindow:
    """Purification: the most likely value within ``radius`` levels of ``x``'s value."""

    def __init__(self, x: Tensor, radius: int) -> None:
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        self.x, self.radius = x, radius

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        return argmax_in_window(log_probs, self.x[:, c, h, w], self.radius)


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
    x = x.clone()
    order = model.decoding_order()
    with NaiveDecoder(model, x, labels) if naive else model.decoder(x, labels) as decoder:
        for step, (c, h, w) in enumerate(tqdm(order, desc="decoding", unit="dim", disable=not progress)):
            x[:, c, h, w] = policy(decoder.conditional(step, c, h, w), c, h, w)
    return x
