"""Logistic regression and the fully visible models built from it.

* ``logistic_regression``: a classifier p(y | x) = softmax(W x + b), the conditional categorical
  model of the first chapter, trained by maximum likelihood (cross-entropy).
* ``fully_visible``: one such regression per dimension, p(x_d | x_<d) = softmax(b_d + W_d x_<d)
  with b_d in R^K and W_d in R^{K x d}, all D of them one masked linear layer (no loop over
  pixels). ``fvsbn`` is the binary case (a sigmoid belief net with one logit per dimension).
Inputs x_<d enter as values in [0, 1] (x / (K - 1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import Decoder
from ..heads import Bernoulli, Categorical, sample_inverse_cdf
from ..layers import MaskedLinear
from . import register
from .base import AutoregressiveModel, RecordsInitArgs, check_images


@register("logistic_regression")
class LogisticRegression(RecordsInitArgs, nn.Module):
    """p(y | x) = softmax(W x / (K - 1) + b) over ``num_classes`` labels; not a density model."""

    kind = "classifier"

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.image_shape, self.num_levels, self.num_classes = tuple(image_shape), num_levels, num_classes
        self.linear = nn.Linear(int(torch.tensor(image_shape).prod()), num_classes)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Class logits [B, num_classes]."""
        return self.linear(x.flatten(1).to(self.linear.weight.dtype) / (self.num_levels - 1))

    def check_input(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = check_images(x, self.image_shape, self.num_levels)
        if labels is not None and (labels.shape != (len(x),) or labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be integers of shape [{len(x)}] in [0, {self.num_classes})")
        return x, labels

    def log_likelihood(self, logits: Tensor, x: Tensor, labels: Tensor) -> Tensor:
        """log p(labels | x) [B] in nats from the output of ``forward``."""
        return logits.log_softmax(-1).gather(1, labels.unsqueeze(1)).squeeze(1)

    def log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        """log p(labels | x): [B], nats."""
        x, labels = self.check_input(x, labels)
        return self.log_likelihood(self(x), x, labels)

    def predict(self, x: Tensor) -> Tensor:
        """The most likely label of each image: [B]."""
        return self(self.check_input(x)[0]).argmax(-1)

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw labels y ~ p(y | x) by inverse CDF of uniforms: [B]."""
        logits = self(self.check_input(x)[0])
        uniform = torch.rand(len(logits), generator=generator, dtype=torch.float64)
        return sample_inverse_cdf(logits.log_softmax(-1), uniform.to(logits.device))


def autoregressive_mask(num_dims: int, outputs_per_dim: int) -> Tensor:
    """[D * p, D] mask: the p outputs of dimension d see inputs j < d (strictly lower)."""
    d = torch.arange(num_dims)
    return (d.unsqueeze(0) < d.unsqueeze(1)).float().repeat_interleave(outputs_per_dim, dim=0)


@register("fully_visible")
class FullyVisible(AutoregressiveModel):
    """One logistic regression per dimension: logits_d = b_d + W_d x_<d, a K-way softmax."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int = 256) -> None:
        super().__init__(image_shape, num_levels, self._make_head(num_levels))
        self.outputs_per_dim = self.head.params_per_dim
        D = self.num_dims
        self.linear = MaskedLinear(D, D * self.outputs_per_dim, autoregressive_mask(D, self.outputs_per_dim))
        nn.init.zeros_(self.linear.weight)  # start at the per-dimension marginal fit by the bias

    def _make_head(self, num_levels: int):
        return Categorical(num_levels)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        out = self.linear(self.raster(self.unit(x)))  # [B, D * p] in raster (= decoding) order
        return self.unraster(out.view(len(x), self.num_dims, -1))

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return FullyVisibleDecoder(self, x, labels)


@register("fvsbn")
class FVSBN(FullyVisible):
    """Fully visible sigmoid belief network: p(x_d = 1 | x_<d) = sigmoid(b_d + w_d . x_<d)."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int = 2) -> None:
        super().__init__(image_shape, num_levels)

    def _make_head(self, num_levels: int):
        return Bernoulli(num_levels)


class FullyVisibleDecoder(Decoder):
    """Incremental logits: at step t only the rows of W for dimension t, times x_<t."""

    def __init__(self, model: FullyVisible, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        self.weight = model.linear.masked_weight()
        self.bias = model.linear.bias
        self.inputs = model.raster(model.unit(x))  # kept in sync one dimension per step
        self.previous: tuple[int, int, int] | None = None

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        model = self.model
        if self.previous is not None:
            self.inputs[:, step - 1] = model.unit(self.x[(slice(None), *self.previous)])
        self.previous = (c, h, w)
        rows = slice(step * model.outputs_per_dim, (step + 1) * model.outputs_per_dim)
        params = F.linear(self.inputs[:, :step], self.weight[rows, :step], self.bias[rows])  # [B, p]
        return model.head.dim_conditional(params)
