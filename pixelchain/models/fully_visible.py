"""The fully visible models: logistic regressions (pixelchain.classifiers.logistic) per dimension.

* ``fully_visible``: one logistic regression per dimension, p(x_d | x_<d) = softmax(b_d + W_d x_<d)
  with b_d in R^K and W_d in R^{K x d}, all D of them one masked linear layer (no loop over
  pixels). ``fvsbn`` is the binary case (a sigmoid belief net with one logit per dimension).
Inputs x_<d enter as values in [0, 1] (x / (K - 1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import Decoder
from ..heads import Bernoulli, Categorical
from ..layers import MaskedLinear
from . import register
from .base import AutoregressiveModel


def autoregressive_mask(num_dims: int, outputs_per_dim: int) -> Tensor:
    """[D * p, D] mask: the p outputs of dimension d see inputs j < d (strictly lower)."""
    d = torch.arange(num_dims)
    return (d.unsqueeze(0) < d.unsqueeze(1)).float().repeat_interleave(outputs_per_dim, dim=0)


@register("fully_visible")
class FullyVisible(AutoregressiveModel):
    """One logistic regression per dimension: logits_d = b_d + W_d x_<d, a K-way softmax."""

    positional = False

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
        self.inputs = model.raster(model.unit(x))  # kept in sync one dimension at a time

    def final(self, step: int, c: int, h: int, w: int) -> None:
        self.inputs[:, step] = self.model.unit(self.x[:, c, h, w])

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        model = self.model
        rows = slice(step * model.outputs_per_dim, (step + 1) * model.outputs_per_dim)
        params = F.linear(self.inputs[:, :step], self.weight[rows, :step], self.bias[rows])  # [B, p]
        return model.head.dim_conditional(params)
