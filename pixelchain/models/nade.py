"""NADE (Larochelle & Murray, 2011): one hidden layer shared by all conditionals.

    a_d = c + W[:, <d] x_<d,    h_d = sigmoid(a_d),    params_d = b_d + V_d h_d

The pre-activations of all D conditionals are an exclusive cumulative sum over dimensions,
O(D * H) per image: a custom autograd function runs it over blocks of dimensions for the whole
batch (a triangular product inside a block, the running sum carried between blocks: cache-sized
states) and gives the gradients in closed form, one image at a time (its [D, H] states fit in
the CPU cache); it keeps the hidden units for the backward pass (B * D * H floats, 200 MB at
B = 128, H = 500): recomputing their sigmoids cost more. Decoding keeps the running
pre-activation, O(H) per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import Decoder
from ..heads import default_head
from . import register
from .base import AutoregressiveModel, check_sizes


def exclusive_cumsum(x: Tensor, reverse: bool = False, block: int = 16) -> Tensor:
    """sum_{j<d} x_j (or sum_{j>d} x_j when ``reverse``) along dim 0 of x [D, ...].

    Computed as triangular matrix products within blocks of ``block`` dims plus a cumulative sum
    of block totals: on CPUs torch.cumsum over an outer dim is a scalar loop, the products run at
    matmul speed. The triangle's zero diagonal keeps x_d out of its own sum exactly.
    """
    D, n = x.shape[0], -(-x.shape[0] // block)
    blocks = F.pad(x.reshape(D, -1), (0, 0, 0, n * block - D)).view(n, block, -1)
    triangle = torch.ones(block, block, dtype=x.dtype, device=x.device)
    triangle = triangle.triu(1) if reverse else triangle.tril(-1)
    totals = blocks.sum(dim=1)  # [n, N]
    if reverse:
        offsets = F.pad(totals[1:].flip(0).cumsum(0).flip(0), (0, 0, 0, 1))
    else:
        offsets = F.pad(totals[:-1], (0, 0, 1, 0)).cumsum(0)
    return (triangle @ blocks + offsets.unsqueeze(1)).view(n * block, *x.shape[1:])[:D]


class NADEParams(torch.autograd.Function):
    """params [B, D, p] = V_d h_d + b_d with h_d = sigmoid(c + sum_{j<d} v_j W_j), V [D, p, H],
    b [D, p]. The forward pass runs over blocks of ``DIM_BLOCK`` dimensions for the whole batch,
    carrying the pre-activation from block to block (inside a block, a triangular product): its
    [block, B, H] states stay in the CPU cache. The hidden units are kept for the backward pass when
    it will run (recomputing their sigmoids costs more than keeping them); the backward pass runs
    ``chunk`` images at a time and gives the gradients in closed form."""

    DIM_BLOCK = 8

    @staticmethod
    def forward(ctx, v: Tensor, W: Tensor, c: Tensor, V: Tensor, b: Tensor, chunk: int) -> Tensor:
        (B, D), k = v.shape, NADEParams.DIM_BLOCK
        Vt = V.transpose(1, 2)  # [D, H, p]
        keep = any(ctx.needs_input_grad)
        hidden = v.new_empty(D, B, W.shape[1]) if keep else None
        out = v.new_empty(D, B, V.shape[1])
        a = c.expand(B, -1).clone()  # the pre-activation of the block's first dimension
        triangle = torch.ones(k, k, dtype=v.dtype, device=v.device).tril(-1)
        for d0 in range(0, D, k):
            n = min(k, D - d0)
            vb, Wb = v[:, d0 : d0 + n], W[d0 : d0 + n]
            terms = vb.t().contiguous().unsqueeze(-1) * Wb.unsqueeze(1)  # [n, B, H]: v_j W_j
            h = torch.matmul(triangle[:n, :n], terms.view(n, -1)).view(n, B, -1).add_(a).sigmoid_()
            torch.bmm(h, Vt[d0 : d0 + n], out=out[d0 : d0 + n])
            if keep:
                hidden[d0 : d0 + n] = h
            a.addmm_(vb, Wb)
        ctx.save_for_backward(v, V, *([hidden] if keep else []))
        ctx.chunk = chunk
        return out.transpose(0, 1) + b

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, V, hidden = ctx.saved_tensors
        dW, dc, dV = V.new_zeros(v.shape[1], V.shape[2]), V.new_zeros(V.shape[2]), torch.zeros_like(V)
        for vc, gc, h in zip(v.split(ctx.chunk), grad.split(ctx.chunk), hidden.split(ctx.chunk, dim=1), strict=True):
            g = gc.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # [D, b, p], fresh strides
            dV += torch.bmm(g.transpose(1, 2), h)
            da = torch.ops.aten.sigmoid_backward(torch.bmm(g, V), h)  # dL/da = dL/dh * h (1 - h)
            dc += da.sum(dim=(0, 1))
            # a_d depends on W_j for j < d: dW_j = sum_b v_bj * sum_{d > j} da_bd
            dW += (vc.t().unsqueeze(-1) * exclusive_cumsum(da, reverse=True)).sum(1)
        return None, dW, dc, dV, grad.sum(0), None


@register("nade")
class NADE(AutoregressiveModel):
    """NADE with ``hidden`` sigmoid units; Bernoulli for K = 2, else a K-way softmax per dim."""

    positional = False

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int = 2, hidden: int = 500) -> None:
        check_sizes(hidden=hidden)
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
        chunk = max(1, (1 << 19) // self.W.numel())  # images whose [D, H] states fill <= 2 MB
        params = NADEParams.apply(self.raster(self.unit(x)), self.W, self.c, self.V, self.b, chunk)
        return self.unraster(params)  # [B, D, p] -> [B, P, H, W]

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return NADEDecoder(self, x, labels)


class NADEDecoder(Decoder):
    """Keeps a = c + W[:, <t] x_<t and adds one column per final dimension."""

    def __init__(self, model: NADE, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        self.a = model.c.expand(x.shape[0], -1).clone()

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        params = self.model.outputs(torch.sigmoid(self.a).unsqueeze(1), slice(step, step + 1))[:, 0]  # [B, p]
        return self.model.head.dim_conditional(params)

    def final(self, step: int, c: int, h: int, w: int) -> None:
        self.a.addcmul_(self.model.unit(self.x[:, c, h, w]).unsqueeze(1), self.model.W[step])
