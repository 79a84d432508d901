"""NADE (Larochelle & Murray, 2011): one hidden layer shared by all conditionals.

    a_d = c + W[:, <d] x_<d,    h_d = sigmoid(a_d),    params_d = b_d + V_d h_d

The pre-activations of all D conditionals are one exclusive cumulative sum over dimensions,
O(D * H) per image with no loop; decoding keeps the running pre-activation, O(H) per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import Decoder
from ..heads import default_head
from . import register
from .base import AutoregressiveModel


@register("nade")
class NADE(AutoregressiveModel):
    """NADE with ``hidden`` sigmoid units; Bernoulli for K = 2, else a K-way softmax per dim."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int = 2, hidden: int = 500) -> None:
        super().__init__(image_shape, num_levels, default_head(num_levels))
        D = self.num_dims
        self.outputs_per_dim = self.head.params_per_dim
        self.W = nn.Parameter(torch.randn(D, hidden) * 0.01)  # input weights, one row per dim
        self.c = nn.Parameter(torch.zeros(hidden))
        self.V = nn.Parameter(torch.randn(D, self.outputs_per_dim, hidden) * 0.01)
        self.b = nn.Parameter(torch.zeros(D, self.outputs_per_dim))

    def outputs(self, h: Tensor, dims: slice | Tensor = slice(None)) -> Tensor:
        """Parameters of the given dims from their hidden states h [B, n, H] -> [B, n, p]."""
        return torch.einsum("bnh,nph->bnp", h, self.V[dims]) + self.b[dims]

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        contributions = self.raster(self.unit(x)).unsqueeze(-1) * self.W  # [B, D, hidden]
        # Exclusive cumulative sum: a_d sums dims < d only (shift, then sum: x_d never enters a_d).
        a = self.c + F.pad(contributions[:, :-1], (0, 0, 1, 0)).cumsum(dim=1)
        return self.unraster(self.outputs(torch.sigmoid(a)))  # [B, D, p] -> [B, P, H, W]

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return NADEDecoder(self, x, labels)


class NADEDecoder(Decoder):
    """Keeps a = c + W[:, <t] x_<t and adds one column per step."""

    def __init__(self, model: NADE, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        self.a = model.c.expand(x.shape[0], -1).clone()
        self.previous: tuple[int, int, int] | None = None

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        model = self.model
        if self.previous is not None:
            value = model.unit(self.x[(slice(None), *self.previous)])
            self.a += value.unsqueeze(1) * model.W[step - 1]
        self.previous = (c, h, w)
        params = model.outputs(torch.sigmoid(self.a).unsqueeze(1), slice(step, step + 1))[:, 0]  # [B, p]
        return model.head.dim_conditional(params)
