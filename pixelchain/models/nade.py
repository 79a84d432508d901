"""NADE (Larochelle & Murray, 2011): one hidden layer shared by all conditionals.

    a_d = c + W[:, <d] x_<d,    h_d = sigmoid(a_d),    params_d = b_d + V_d h_d

The pre-activations of all D conditionals are an exclusive cumulative sum over dimensions,
O(D * H) per image: a custom autograd function runs it over blocks of dimensions for the whole
batch (a triangular product inside a block, the running sum carried between blocks: cache-sized
states) and gives the gradients in closed form, block by block in reverse. It keeps the hidden
units for the backward pass (B * D * H floats, 200 MB at B = 128, H = 500), which is cheaper than
recomputing them; the B * D * H sigmoids are the floor of a pass (timings against the peer's NADE
in BENCHMARKS.md). Decoding keeps the running pre-activation, O(H) per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..decode import Decoder, DimensionViews
from ..heads import default_head
from . import register
from .base import AutoregressiveModel, check_sizes


def pad_dims(t: Tensor, dims: int) -> Tensor:
    """t [D, ...] zero-padded to [dims, ...] along dim 0 (t itself when D = dims)."""
    return t if len(t) == dims else torch.cat([t, t.new_zeros(dims - len(t), *t.shape[1:])])


class NADEParams(torch.autograd.Function):
    """params [B, D, p] = V_d h_d + b_d with h_d = sigmoid(c + sum_{j<d} v_j W_j): v [B, D] (the
    inputs, any real values), W [D, H], c [H], V [D, p, H], b [D, p].

    Dimensions run in blocks of k = ``DIM_BLOCK`` (D zero-padded to n * k) with the whole batch,
    each block's states [k, B, H] laid out dimension-major so every block is contiguous. Inside a
    block the pre-activations are one product ``M @ W_block`` with M [(i, b), j] = v_bj [j < i]
    (k multiply-adds per state, at matmul speed: a cumulative sum over dims is a scalar loop on CPUs)
    plus the pre-activation ``a`` [B, H] of the block's first dimension, carried from block to block.
    The outputs and the gradients of V are batched matrix products over the block's dims; the
    gradient of W is ``M^T @ da`` inside the block plus ``v_block^T @ R`` for the later blocks, R
    [B, H] the running sum of dL/da over the dims after the block (so R ends as dL/dc summed over
    dims). Padded dims have v = 0, W = V = 0 and zero gradient, so they change nothing. ``grad``:
    whether a backward pass may follow (the caller's ``torch.is_grad_enabled()``).
    """

    DIM_BLOCK = 8

    @staticmethod
    def forward(ctx, v: Tensor, W: Tensor, c: Tensor, V: Tensor, b: Tensor, grad: bool = True) -> Tensor:
        (B, D), k, H, p = v.shape, NADEParams.DIM_BLOCK, W.shape[1], V.shape[1]
        n = -(-D // k)
        vb = pad_dims(v.t(), n * k).contiguous().view(n, k, B)  # the inputs of each block
        Wb, Vb = pad_dims(W, n * k).view(n, k, H), pad_dims(V, n * k).view(n, k, p, H)
        triangle = torch.ones(k, k, dtype=v.dtype, device=v.device).tril(-1)  # [i, j] = [j < i]
        M = (triangle.view(1, k, 1, k) * vb.transpose(1, 2).unsqueeze(1)).reshape(n, k * B, k)
        # Keep the hidden units only when a backward pass can follow (inside a Function's forward
        # needs_input_grad is True for parameters even under torch.no_grad, hence ``grad``).
        keep = grad and any(ctx.needs_input_grad)
        hidden = v.new_empty(n, k, B, H) if keep else None
        pre = v.new_empty(k, B, H)  # a block's pre-activations (cache-sized)
        out = v.new_empty(n, k, p, B)
        a = c.expand(B, H).clone()  # pre-activation of the block's first dimension
        for i in range(n):
            pre.copy_(a.expand(k, B, H)).view(k * B, H).addmm_(M[i], Wb[i])
            torch.addcmul(pre[-1], vb[i, -1].unsqueeze(1), Wb[i, -1], out=a)  # the next block's first
            h = torch.sigmoid(pre, out=hidden[i]) if keep else pre.sigmoid_()
            torch.bmm(Vb[i], h.transpose(1, 2), out=out[i])  # [k, p, B]
        if keep:
            ctx.save_for_backward(vb, Vb, M, hidden)
        ctx.dims = D
        return out.view(n * k, p, B)[:D].permute(2, 0, 1) + b

    @staticmethod
    def backward(ctx, grad: Tensor):
        vb, Vb, M, hidden = ctx.saved_tensors
        (n, k, B, H), p, D = hidden.shape, Vb.shape[2], ctx.dims
        g = pad_dims(grad.permute(1, 2, 0), n * k).view(n, k, p, B)  # dL/dparams per block
        dW, dV = hidden.new_empty(n, k, H), hidden.new_empty(n, k, p, H)
        R = hidden.new_zeros(B, H)  # sum of dL/da over the dims after the current block
        for i in reversed(range(n)):
            h = hidden[i]
            torch.bmm(g[i], h, out=dV[i])
            # dL/da = (dL/dh) h (1 - h), dL/dh = g^T V per dim: [k, B, H]
            da = torch.ops.aten.sigmoid_backward(torch.einsum("kpb,kph->kbh", g[i], Vb[i]), h)
            torch.mm(M[i].t(), da.view(k * B, H), out=dW[i]).addmm_(vb[i], R)
            R += da.sum(0)
        return None, dW.view(n * k, H)[:D], R.sum(0), dV.view(n * k, p, H)[:D], grad.sum(0), None


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

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        params = NADEParams.apply(self.raster(self.unit(x)), self.W, self.c, self.V, self.b, torch.is_grad_enabled())
        return self.unraster(params)  # [B, D, p] -> [B, P, H, W]

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return NADEDecoder(self, x, labels)


class NADEDecoder(Decoder):
    """Keeps a = c + W[:, <t] x_<t [B, H] and adds one row of W per final dimension: per step a
    sigmoid and one product for the conditional, one rank-one update for ``final``, on rows of W,
    V and b split once (a Python list costs no op per step, indexing a tensor does)."""

    def __init__(self, model: NADE, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        self.a = model.c.expand(x.shape[0], -1).clone()
        # per dim: W_d [H], b_d [p], V_d^T [H, p]
        self.W, self.b, self.V = model.W.unbind(0), model.b.unbind(0), model.V.transpose(1, 2).unbind(0)
        self.h = torch.empty_like(self.a)  # sigmoid(a), written in place each step
        self.inputs = DimensionViews(x, column=True)  # the canvas's dims, int64 [B, 1]

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        hidden = torch.sigmoid(self.a, out=self.h)
        return self.model.head.dim_conditional(torch.addmm(self.b[step], hidden, self.V[step]))

    def final(self, step: int, c: int, h: int, w: int) -> None:
        # a += unit(x) W_d, unit(x) = x / (K - 1) folded into ``value``
        self.a.addcmul_(self.inputs(c, h, w), self.W[step], value=1 / (self.model.num_levels - 1))
