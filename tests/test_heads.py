"""Likelihood heads and the samplers built on them."""

import math

import pytest
import torch
from scipy import stats

from pixelchain.heads import (
    Bernoulli,
    Categorical,
    DiscretizedLogisticMixture,
    argmax_in_window,
    sample_inverse_cdf,
)


def test_inverse_cdf_sampler_passes_chi_square():
    """Draws from a fixed categorical match its probabilities (chi-square, 10 categories)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.01, 0.04, 0.1, 0.2, 0.05, 0.15, 0.25, 0.1, 0.07, 0.03], dtype=torch.float64)
    n = 200_000
    values = sample_inverse_cdf(probs.log().expand(n, -1), torch.rand(n, generator=g, dtype=torch.float64))
    counts = torch.bincount(values, minlength=10).double()
    statistic, p_value = stats.chisquare(counts.numpy(), (probs * n).numpy())
    assert p_value > 1e-3, f"chi-square {statistic:.1f}, p = {p_value:.2g}"


def test_inverse_cdf_extremes_and_zero_probabilities():
    log_probs = torch.tensor([[-math.inf, 0.0, -math.inf], [math.log(0.5), math.log(0.5), -math.inf]])
    assert sample_inverse_cdf(log_probs, torch.tensor([0.0, 0.0])).tolist() == [1, 0]
    assert sample_inverse_cdf(log_probs, torch.tensor([1 - 1e-12, 1 - 1e-12], dtype=torch.float64)).tolist() == [1, 1]
    assert sample_inverse_cdf(log_probs, torch.tensor([1.0, 1.0])).tolist() == [1, 1]  # never a value of p = 0


def test_argmax_in_window():
    log_probs = torch.tensor([[0.0, -1.0, -2.0, -3.0, 5.0]]).log_softmax(-1)
    assert argmax_in_window(log_probs, torch.tensor([1]), 1).item() == 0
    assert argmax_in_window(log_probs, torch.tensor([2]), 2).item() == 4
    assert argmax_in_window(log_probs, torch.tensor([2]), 0).item() == 2


@pytest.mark.parametrize("head", [Bernoulli(), Categorical(5)])
def test_per_dimension_heads_agree_with_their_conditionals(head):
    C, K = 3, head.num_levels
    params = torch.randn(4, head.param_channels(C), 2, 2, dtype=torch.float64)
    x = torch.randint(0, K, (4, C, 2, 2))
    per_dim = head.log_prob(params, x)
    for c in range(C):
        conditional = head.conditional(params[:, :, 1, 0], x[:, :, 1, 0], c)
        torch.testing.assert_close(conditional.exp().sum(-1), torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(conditional.gather(1, x[:, c, 1, 0, None]).squeeze(1), per_dim[:, c, 1, 0])


@pytest.mark.parametrize("C,K", [(1, 2), (1, 7), (1, 256), (3, 2), (3, 7)])
@pytest.mark.parametrize("spread", [0.05, 1.0, 20.0])
def test_logistic_mixture_sums_to_one_over_all_values(C, K, spread):
    """p(pixel) over all K^C values sums to 1, for tiny scales and far-off means too."""
    head = DiscretizedLogisticMixture(K, num_mixtures=3)
    torch.manual_seed(0)
    params = torch.randn(1, head.param_channels(C), 1, 1, dtype=torch.float64) * spread
    every = torch.cartesian_prod(*[torch.arange(K)] * C).view(-1, C, 1, 1)
    total = head.log_prob(params.expand(len(every), -1, -1, -1), every).sum(dim=1).exp().sum().item()
    assert abs(total - 1) < 1e-9


def test_logistic_mixture_conditionals_match_log_prob():
    head = DiscretizedLogisticMixture(16, num_mixtures=4)
    params = torch.randn(5, head.param_channels(3), 2, 3, dtype=torch.float64)
    x = torch.randint(0, 16, (5, 3, 2, 3))
    per_dim = head.log_prob(params, x)
    for c in range(3):
        conditional = head.conditional(params[:, :, 1, 2], x[:, :, 1, 2], c)
        torch.testing.assert_close(conditional.exp().sum(-1), torch.ones(5, dtype=torch.float64))
        torch.testing.assert_close(conditional.gather(1, x[:, c, 1, 2, None]).squeeze(1), per_dim[:, c, 1, 2])


def test_logistic_mixture_edge_bins_are_open():
    """x = 0 takes all mass below its bin, x = K - 1 all mass above: a mean far outside [-1, 1]
    puts (almost) everything on the edge value, and the gradients stay finite."""
    K, head = 8, DiscretizedLogisticMixture(8, num_mixtures=1)
    params = torch.tensor([[0.0, 50.0, -2.0]], dtype=torch.float64).view(1, 3, 1, 1).requires_grad_()
    top = head.log_prob(params, torch.full((1, 1, 1, 1), K - 1))
    assert top.item() > -1e-12
    top.backward()
    assert torch.isfinite(params.grad).all()
    low = head.log_prob(params.detach(), torch.zeros(1, 1, 1, 1, dtype=torch.long))
    assert low.item() < -100


def test_bernoulli_conditional_is_logsigmoid_of_both_signs():
    logsigmoid = torch.nn.functional.logsigmoid
    for params in (torch.tensor([[-30.0], [-1.5], [0.0], [2.0], [40.0]]), torch.randn(6, 1, dtype=torch.float64)):
        expected = torch.cat([logsigmoid(-params), logsigmoid(params)], dim=-1)
        assert torch.equal(Bernoulli().dim_conditional(params), expected)


def test_sample_draws_the_generator_stream_in_order():
    """Uniforms drawn in blocks are the values a draw per step gives (batch sizes changing, a block
    running out), so the same seed samples the same values."""
    from pixelchain.decode import Sample

    sample, g = Sample(torch.Generator().manual_seed(7)), torch.Generator().manual_seed(7)
    sample.STEPS = 3
    for n in (4, 4, 5, 1, 9, 4, 30):
        expected = torch.rand(n, generator=g, dtype=torch.float64)
        assert torch.equal(sample.next_uniforms(n, torch.device("cpu")).squeeze(1), expected)
