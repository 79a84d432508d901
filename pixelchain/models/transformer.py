"""A decoder-only Transformer over the D = C * H * W values in raster order (channels inside a pixel).

Token t is the embedding of the value before it, x_{t-1} (a learned start value at t = 0), plus a
learned embedding of its position (and so of its channel). Pre-norm blocks (LayerNorm -> causal
self-attention -> residual, LayerNorm -> MLP(4x, GELU) -> residual), a final LayerNorm and a
linear layer give the head's parameters of dimension t. Decoding keeps every block's keys and
values (a KV cache): step t runs token t alone, [B, dim], through the blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decode import Decoder
from ..heads import default_head
from . import register
from .base import AutoregressiveModel, check_sizes


class KVCache:
    """One attention layer's keys and values of the tokens so far, and the attention of the next
    token over them.

    The layer's qkv projection is laid out head-major once, [dim, heads * (q, k, v) * head_dim],
    so that a token's projections viewed as [B * heads, 3, head_dim] give every (image, head) its
    query, key and value side by side. Keys and values are kept as [B * heads, D, (k, v),
    head_dim]: one copy stores a token's, and the scores and the weighted values are one batched
    matrix product each over the prefix, read in place (a memory-bound step: it reads every
    kept key and value once).
    """

    def __init__(self, attn: SelfAttention, batch: int, length: int) -> None:
        weight, bias = attn.qkv.weight.detach(), attn.qkv.bias.detach()  # [3 * dim, dim], rows (q, k, v)
        heads, dim = attn.num_heads, weight.shape[1]
        self.head_dim = dim // heads
        order = torch.arange(3 * dim, device=weight.device).view(3, heads, -1).transpose(0, 1).flatten()
        self.matrix, self.bias = weight[order].t().contiguous(), bias[order]
        self.kv = weight.new_zeros(batch * heads, length, 2, self.head_dim)
        self.scale = self.head_dim**-0.5
        self.size = 0

    def attend(self, x: Tensor) -> Tensor:
        """Token x [B, dim] (normalised): keep its key and value, return its attention over every
        token so far, itself included, [B, dim] (heads concatenated)."""
        t = self.size = self.size + 1
        qkv = torch.addmm(self.bias, x, self.matrix).view(-1, 3, self.head_dim)  # [B * heads, 3, hd]
        self.kv[:, t - 1] = qkv[:, 1:]
        keys, values = self.kv[:, :t, 0], self.kv[:, :t, 1]  # [B * heads, t, hd]
        # [B * heads, 1, t], scaled in the product; with beta = 0 its input (any [1, 1, 1]) is not read
        scores = torch.baddbmm(self.kv[:1, :1, 0, :1], qkv[:, :1], keys.transpose(1, 2), beta=0, alpha=self.scale)
        return torch.bmm(scores.softmax(dim=-1), values).view(len(x), -1)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: x [B, T, dim] -> [B, T, dim].

    With a ``cache``, x [B, dim] is the next token alone: it attends to itself and every token
    before it, whose keys and values the cache holds.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        if cache is not None:
            return self.resid_dropout(self.proj(cache.attend(x)))
        B, T, dim = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [B, heads, T, hd]
        # No dropout on the attention weights: it would force the unfused kernel, which stores
        # a T x T matrix per head (GBs at T = 784 on the CPU); dropout acts on the residuals.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, dim)))


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then + MLP(LayerNorm(x)): [B, T, dim] -> [B, T, dim]."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x [B, T, dim], or with a ``cache`` the next token [B, dim]."""
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


@register("transformer")
class Transformer(AutoregressiveModel):
    """``num_layers`` blocks of width ``dim`` with ``num_heads`` heads."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int = 2, dim: int = 64,
                 num_layers: int = 4, num_heads: int = 4, dropout: float = 0.0) -> None:
        check_sizes(dim=dim, num_layers=num_layers, num_heads=num_heads)
        super().__init__(image_shape, num_levels, default_head(num_levels))
        self.num_heads = num_heads
        self.value_embedding = nn.Embedding(num_levels + 1, dim)  # value K stands for "start"
        self.position_embedding = nn.Parameter(torch.randn(self.num_dims, dim) * 0.02)
        nn.init.normal_(self.value_embedding.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, num_heads, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.readout = nn.Linear(dim, self.head.params_per_dim)

    def run(self, previous: Tensor, positions: slice, caches: list[KVCache] | None = None) -> Tensor:
        """Parameters [B, T, p] of the dimensions at ``positions`` from the values before them,
        ``previous`` [B, T] (K for the start); with ``caches``, of the next dimension alone: [B, p]
        from ``previous`` [B]."""
        x = self.dropout(self.value_embedding(previous) + self.position_embedding[positions])
        for n, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[n])
        return self.readout(self.ln_f(x))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        previous = F.pad(self.raster(x)[:, :-1], (1, 0), value=self.num_levels)  # x_{t-1}, start first
        return self.unraster(self.run(previous, slice(None)))

    def decoder(self, x: Tensor, labels: Tensor | None = None) -> Decoder:
        return TransformerDecoder(self, x, labels)


class TransformerDecoder(Decoder):
    """Step t runs token t (the value final at step t - 1) through the blocks and their caches."""

    def __init__(self, model: Transformer, x: Tensor, labels: Tensor | None = None) -> None:
        super().__init__(model, x, labels)
        self.caches = [KVCache(block.attn, len(x), model.num_dims) for block in model.blocks]
        self.previous = x.new_full((len(x),), model.num_levels)  # the start value

    def final(self, step: int, c: int, h: int, w: int) -> None:
        self.previous = self.x[:, c, h, w]

    def conditional(self, step: int, c: int, h: int, w: int) -> Tensor:
        model = self.model
        return model.head.dim_conditional(model.run(self.previous, slice(step, step + 1), self.caches))
