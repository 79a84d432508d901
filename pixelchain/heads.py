"""Likelihood heads: turn a network's per-pixel parameters into per-dimension log-probabilities.

Every model outputs ``params`` of shape [B, P, H, W] (P = ``head.param_channels(C)``), one
parameter vector per pixel. A head gives

* ``log_prob(params, x)`` -> [B, C, H, W]: log p(x_c | x_<c) per dimension, in nats;
* ``conditional(params_pixel, x_pixel, c)`` -> [B, K]: the normalised log-probabilities of every
  value of channel ``c`` of one pixel given that pixel's earlier channels (used by decoding).

Decoding then works on those [B, K] log-probabilities alone, so sampling (inverse CDF of a uniform)
and the windowed argmax (PixelDefend purification) are written once, below, for every head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class Head:
    """Base class. ``num_levels`` K is the number of values a dimension can take."""

    name = ""

    def __init__(self, num_levels: int) -> None:
        self.num_levels = num_levels

    def param_channels(self, channels: int) -> int:
        raise NotImplementedError

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def conditional(self, params: Tensor, x: Tensor, c: int) -> Tensor:
        raise NotImplementedError


class PerDimensionHead(Head):
    """A head whose dimensions have parameters of their own: ``params_per_dim`` per dimension,
    channel c of a pixel reading block [c * p, (c + 1) * p) of the pixel's parameters."""

    params_per_dim = 1

    def param_channels(self, channels: int) -> int:
        return channels * self.params_per_dim

    def dim_conditional(self, params: Tensor) -> Tensor:
        """One dimension's parameters [B, p] -> log-probabilities of its K values [B, K]."""
        raise NotImplementedError

    def conditional(self, params: Tensor, x: Tensor, c: int) -> Tensor:
        p = self.params_per_dim
        return self.dim_conditional(params[:, c * p : (c + 1) * p])


class Bernoulli(PerDimensionHead):
    """K = 2: one logit per dimension, params[:, c] = logit p(x_c = 1)."""

    name = "bernoulli"

    def __init__(self, num_levels: int = 2) -> None:
        if num_levels != 2:
            raise ValueError(f"the Bernoulli head models 2 levels, got num_levels={num_levels}")
        super().__init__(2)
        self.signs: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # [-1, 1] per device and dtype

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(params, x.to(params.dtype), reduction="none")

    def dim_conditional(self, params: Tensor) -> Tensor:
        """[log p(0), log p(1)] = logsigmoid([-logit, logit]): one product with the signs and one
        logsigmoid (exact: negation is)."""
        signs = self.signs.get((params.device, params.dtype))
        if signs is None:
            signs = self.signs[params.device, params.dtype] = torch.tensor([-1.0, 1.0], dtype=params.dtype,
                                                                            device=params.device)
        return F.logsigmoid(params * signs)


class Categorical(PerDimensionHead):
    """K-way softmax per dimension: params viewed as [B, C, K, H, W] (channel-major)."""

    name = "categorical"

    def __init__(self, num_levels: int) -> None:
        super().__init__(num_levels)
        self.params_per_dim = num_levels

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        logits = params.view(B, C, self.num_levels, H, W)
        return logits.log_softmax(dim=2).gather(2, x.unsqueeze(2)).squeeze(2)

    def dim_conditional(self, params: Tensor) -> Tensor:
        return params.log_softmax(dim=-1)


def _log_bin_mass(upper: Tensor, lower: Tensor) -> Tensor:
    """log(sigmoid(upper) - sigmoid(lower)) for upper > lower, exact and stable everywhere.

    sigmoid(a) - sigmoid(b) = (e^a - e^b) / ((1 + e^a)(1 + e^b)), so the log is
    a + log(1 - e^(b - a)) - softplus(a) - softplus(b). An infinite bound stands for the
    open edge bins (x = 0: lower = -inf; x = K - 1: upper = +inf).
    """
    finite = torch.isfinite(upper) & torch.isfinite(lower)
    a = torch.where(finite, upper, torch.ones_like(upper))  # placeholders keep the unused
    b = torch.where(finite, lower, torch.zeros_like(lower))  # branch finite (and its gradient)
    middle = a + torch.log(-torch.expm1(b - a)) - F.softplus(a) - F.softplus(b)
    left_edge = F.logsigmoid(upper)  # lower = -inf
    right_edge = F.logsigmoid(-lower)  # upper = +inf
    return torch.where(finite, middle, torch.where(torch.isinf(lower), left_edge, right_edge))


class DiscretizedLogisticMixture(Head):
    """PixelCNN++'s head: a mixture of M discretised logistics per pixel.

    Values v in {0..K-1} sit at centres 2v/(K-1) - 1 in [-1, 1], bins of half-width 1/(K-1); the
    edge bins extend to -inf and +inf. For RGB, the mean of G is shifted by a*R and the mean of B
    by b*R + c*G (coefficients per mixture component), so the channels of a pixel are
    autoregressive inside the head. params per pixel, P = M * (1 + 2C + C(C-1)/2):
    [mixture logits M | means C*M | log-scales C*M | coefficients C(C-1)/2 * M].
    """

    name = "discretized_logistic_mixture"

    def __init__(self, num_levels: int, num_mixtures: int = 5) -> None:
        super().__init__(num_levels)
        self.num_mixtures = num_mixtures

    def param_channels(self, channels: int) -> int:
        return self.num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _split(self, params: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """params [B, P, ...] -> logits [B,M,...], means, log_scales [B,C,M,...], coeffs [B,n,M,...]."""
        M, C, B, rest = self.num_mixtures, channels, params.shape[0], params.shape[2:]
        logits, means, log_scales, coeffs = params.split([M, C * M, C * M, C * (C - 1) // 2 * M], dim=1)
        return (
            logits,
            means.reshape(B, C, M, *rest),
            log_scales.reshape(B, C, M, *rest).clamp(min=-7.0),
            torch.tanh(coeffs.reshape(B, C * (C - 1) // 2, M, *rest)),
        )

    def _centre(self, x: Tensor) -> Tensor:
        return x * (2.0 / (self.num_levels - 1)) - 1.0

    def _component_log_prob(self, value: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
        """log p_m(v): value (int) and mean/log_scale broadcast together."""
        K = self.num_levels
        half = 1.0 / (K - 1)
        centred = self._centre(value.to(mean.dtype)) - mean
        inv_scale = torch.exp(-log_scale)
        upper = torch.where(value == K - 1, torch.full_like(centred, math.inf), (centred + half) * inv_scale)
        lower = torch.where(value == 0, torch.full_like(centred, -math.inf), (centred - half) * inv_scale)
        return _log_bin_mass(upper, lower)

    def _shifted_means(self, means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
        """Means with the linear dependence on earlier channels: means [B,C,M,...], x [B,C,...]."""
        if means.shape[1] == 1:
            return means
        xc = self._centre(x.to(means.dtype)).unsqueeze(2)  # [B, C, 1, ...]
        r, g = xc[:, 0], xc[:, 1]
        return torch.stack(
            [
                means[:, 0],
                means[:, 1] + coeffs[:, 0] * r,
                means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g,
            ],
            dim=1,
        )

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        C = x.shape[1]
        logits, means, log_scales, coeffs = self._split(params, C)
        means = self._shifted_means(means, coeffs, x)
        per_channel = self._component_log_prob(x.unsqueeze(2), means, log_scales)  # [B,C,M,H,W]
        log_weights = logits.log_softmax(dim=1)  # [B,M,H,W]
        # log p(x_<=c) for c = 0..C-1, then per-channel conditionals as differences.
        joint = torch.logsumexp(log_weights.unsqueeze(1) + per_channel.cumsum(dim=1), dim=2)
        return torch.cat([joint[:, :1], joint[:, 1:] - joint[:, :-1]], dim=1)

    def conditional(self, params: Tensor, x: Tensor, c: int) -> Tensor:
        C = x.shape[1]
        logits, means, log_scales, coeffs = self._split(params, C)  # means [B,C,M]
        means = self._shifted_means(means, coeffs, x)
        log_weights = logits.log_softmax(dim=1)  # [B,M]
        if c > 0:  # posterior over components given the pixel's earlier channels
            earlier = self._component_log_prob(x[:, :c].unsqueeze(2), means[:, :c], log_scales[:, :c])
            log_weights = (log_weights + earlier.sum(dim=1)).log_softmax(dim=1)
        per_value = self._all_values_log_prob(means[:, c], log_scales[:, c])  # [B,K,M]
        return torch.logsumexp(log_weights.unsqueeze(1) + per_value, dim=-1)  # [B,K]

    def _all_values_log_prob(self, mean: Tensor, log_scale: Tensor) -> Tensor:
        """log p_m(v) for every value v at once: mean, log_scale [B, M] -> [B, K, M].

        _log_bin_mass's identity over the K - 1 bin edges z_j = (edge_j - mean) / scale, each
        softplus computed once and shared by the two bins it bounds: bin j's upper and lower
        edges are z_j and z_{j-1}, and since every bin has the same width, log(1 - e^(z_{j-1} -
        z_j)) is one number per component. log p(0) = z_0 - softplus(z_0), log p(K-1) =
        -softplus(z_{K-2}), the middle bins z_j - softplus(z_j) - softplus(z_{j-1}) + that number.
        """
        K = self.num_levels
        width = 2.0 / (K - 1)
        edges = torch.arange(K - 1, device=mean.device, dtype=mean.dtype).mul_(width).add_(width / 2 - 1.0)
        inv_scale = torch.exp(-log_scale).unsqueeze(1)  # [B,1,M]
        z = (edges.view(1, -1, 1) - mean.unsqueeze(1)) * inv_scale  # [B,K-1,M]
        soft = F.softplus(z)
        out = z.new_empty(z.shape[0], K, z.shape[2])
        out[:, : K - 1] = z - soft
        out[:, K - 1] = 0.0
        out[:, 1:] -= soft
        out[:, 1 : K - 1] += torch.log(-torch.expm1(-width * inv_scale))
        return out


def default_head(num_levels: int) -> Head:
    """Bernoulli for K = 2, a K-way softmax otherwise: the head of models that don't choose."""
    return Bernoulli() if num_levels == 2 else Categorical(num_levels)


def sample_inverse_cdf(log_probs: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF sampling: log_probs [B, K] (normalised), uniform [B] in [0, 1) -> values [B].

    Returns the smallest v with CDF(v) > u, so value v is drawn with probability p(v); values of
    probability 0 are never drawn (u is kept below 1, the CDF's rounding absorbed at the top).
    The result always lies in [0, K): a conditional that is NaN or has no mass (non-finite
    weights) raises ValueError instead.
    """
    return inverse_cdf(log_probs, uniform.double().clamp(0.0, 1.0 - 2.0**-53).unsqueeze(-1))


def inverse_cdf(log_probs: Tensor, u: Tensor) -> Tensor:
    """``sample_inverse_cdf`` for u [B, 1], float64 in [0, 1) already (decoding's per-step path)."""
    cdf = log_probs.double().exp().cumsum(dim=-1)
    # Entries after the last non-zero probability become exactly 1; a row without mass (its total
    # 0, inf or NaN) becomes NaN at the top, where searchsorted (NaN compares false) answers K.
    cdf = cdf / cdf[:, -1:]
    values = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    if values.numel() and int(values.max()) == log_probs.shape[-1]:  # one check, no op per row
        raise ValueError("a conditional distribution is NaN or has no probability mass: are the model's "
                         "weights finite?")
    return values


def argmax_in_window(log_probs: Tensor, centre: Tensor, radius: int) -> Tensor:
    """Most likely value within [centre - radius, centre + radius]: log_probs [B, K], centre [B]."""
    values = torch.arange(log_probs.shape[-1], device=log_probs.device)
    outside = (values.unsqueeze(0) - centre.unsqueeze(-1)).abs() > radius
    return log_probs.masked_fill(outside, -math.inf).argmax(dim=-1)
