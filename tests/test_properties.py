"""The properties every density model has (DESIGN.md), checked over every registered model.

A model registered without an entry in TINY fails ``test_every_model_is_covered``, so no model
escapes these tests.
"""

import itertools

import pytest
import torch

import pixelchain as pc
from pixelchain.decode import NaiveDecoder, Sample, decode

# Small hyperparameters per model, and the numbers of levels its head supports.
TINY = {
    "fvsbn": ({}, (2,)),
    "fully_visible": ({}, (2, 3, 5)),
    "nade": ({"hidden": 7}, (2, 3, 5)),
    "made": ({"hidden": (11, 9), "direct": True}, (2, 3, 5)),
    # a mixture, whose conditionals (map, decoders) must agree with its log_prob
    "made_ensemble": ({"hidden": (11, 9), "num_masks": 3, "direct": True}, (2, 3, 5)),
    "pixelcnn": ({"channels": 6, "num_blocks": 2, "kernel_size": 3, "head_channels": 6}, (2, 3, 5)),
    "gated_pixelcnn": ({"channels": 6, "num_layers": 3, "kernel_size": 3, "head_channels": 6}, (2, 3, 5)),
    "pixelcnn_pp": ({"channels": 6, "num_resnet": 1, "num_mixtures": 2, "num_scales": 2}, (2, 3, 5)),
    "row_lstm": ({"channels": 6, "num_layers": 2, "kernel_size": 3}, (2, 3, 5)),
    "diagonal_bilstm": ({"channels": 6, "num_layers": 2}, (2, 3, 5)),
    "transformer": ({"dim": 8, "num_layers": 2, "num_heads": 2}, (2, 3, 5)),
}
DENSITY_MODELS = pc.list_models("density")
# Configurations beyond one per model that make other promises: PixelCNN++ with a free softmax head.
VARIANTS = {
    "pixelcnn_pp_softmax": ("pixelcnn_pp", {"channels": 6, "num_resnet": 1, "num_scales": 2, "head": "softmax"},
                            (2, 3, 5)),
}
COVERED = DENSITY_MODELS + list(VARIANTS)

# (image_shape, K): tiny enough to enumerate every configuration.
ENUMERABLE = [((1, 2, 3), 2), ((1, 2, 2), 3), ((3, 1, 2), 2)]
# Larger shapes for the autoregressive and decoding checks (receptive fields, sub-pixel masks).
LARGER = [((1, 5, 4), 3), ((3, 4, 3), 5)]


def build(name, image_shape, K, seed=0):
    name, hparams, levels = VARIANTS[name] if name in VARIANTS else (name, *TINY[name])
    if K not in levels:
        pytest.skip(f"{name} does not model {K} levels")
    torch.manual_seed(seed)
    model = pc.create(name, image_shape, K, **hparams).double().eval()
    with torch.no_grad():  # random weights, so that no property holds by accident of the init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def random_images(n, image_shape, K, seed=1):
    return torch.randint(0, K, (n, *image_shape), generator=torch.Generator().manual_seed(seed))


def test_every_model_is_covered():
    assert set(DENSITY_MODELS) == set(TINY), "add every registered density model to TINY"


def reference_conditional(model, x, step):
    """The conditional at ``step`` of the model's reference decoder given x's earlier dimensions
    (a mixture's decoder keeps state: it is taken through the earlier steps first)."""
    order = model.decoding_order()
    decoder = model.naive_decoder(x)
    if not isinstance(decoder, NaiveDecoder):
        for s, (c, h, w) in enumerate(order[:step]):
            decoder.conditional(s, c, h, w)
            decoder.final(s, c, h, w)
    return decoder.conditional(step, *order[step])


@pytest.mark.parametrize("image_shape,K", ENUMERABLE)
@pytest.mark.parametrize("name", COVERED)
def test_normalisation(name, image_shape, K):
    model = build(name, image_shape, K)
    D = model.num_dims
    every = torch.tensor(list(itertools.product(range(K), repeat=D))).view(-1, *image_shape)
    with torch.no_grad():
        total = model.log_prob(every).exp().sum().item()
    assert abs(total - 1.0) < 1e-5


@pytest.mark.parametrize("image_shape,K", ENUMERABLE[:1] + LARGER)
@pytest.mark.parametrize("name", COVERED)
def test_log_prob_map_sums_to_log_prob(name, image_shape, K):
    model = build(name, image_shape, K)
    x = random_images(4, image_shape, K)
    with torch.no_grad():
        per_dim = model.log_prob_map(x)
        assert per_dim.shape == x.shape
        assert (per_dim <= 1e-12).all()
        torch.testing.assert_close(per_dim.flatten(1).sum(1), model.log_prob(x))


@pytest.mark.parametrize("image_shape,K", ENUMERABLE[1:] + LARGER)
@pytest.mark.parametrize("name", DENSITY_MODELS)
def test_autoregressive(name, image_shape, K):
    """Changing any dimension at or after d in the order leaves the conditional of d unchanged."""
    model = build(name, image_shape, K)
    order = model.decoding_order()
    x = random_images(3, image_shape, K)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for step, (c, h, w) in enumerate(order):
            changed = x.clone()
            for cc, hh, ww in order[step:]:
                changed[:, cc, hh, ww] = torch.randint(0, K, (3,), generator=g)
            before, after = (reference_conditional(model, images, step) for images in (x, changed))
            torch.testing.assert_close(after, before, rtol=0, atol=1e-10, msg=f"dimension {(c, h, w)}")


class Recorder:
    """A sampling policy that also keeps every conditional it was given."""

    def __init__(self, generator):
        self.sample, self.seen = Sample(generator), []

    def __call__(self, log_probs, c, h, w):
        self.seen.append(log_probs.clone())
        return self.sample(log_probs, c, h, w)


@pytest.mark.parametrize("image_shape,K", ENUMERABLE[:1] + LARGER)
@pytest.mark.parametrize("name", COVERED)
def test_cached_decoding_equals_naive(name, image_shape, K):
    model = build(name, image_shape, K)
    start = torch.zeros(3, *image_shape, dtype=torch.long)
    cached, naive = Recorder(torch.Generator().manual_seed(5)), Recorder(torch.Generator().manual_seed(5))
    x_cached = decode(model, start, cached)
    x_naive = decode(model, start, naive, naive=True)
    assert torch.equal(x_cached, x_naive)
    assert len(cached.seen) == model.num_dims
    for a, b in zip(cached.seen, naive.seen, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    # The public entry point gives the same samples on both paths.
    s1 = model.sample(2, generator=torch.Generator().manual_seed(3))
    s2 = model.sample(2, generator=torch.Generator().manual_seed(3), naive=True)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("naive", [False, True])
@pytest.mark.parametrize("name", COVERED)
def test_complete_keeps_observed(name, naive):
    image_shape, K = (3, 4, 3), max((VARIANTS.get(name) or TINY[name])[-1])
    model = build(name, image_shape, K)
    x = random_images(4, image_shape, K)
    observed = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    observed[:, :, : image_shape[1] // 2] = True  # a top half, as in the completion figures
    out = model.complete(x, observed, generator=torch.Generator().manual_seed(1), naive=naive)
    assert out.shape == x.shape and out.dtype == torch.long
    assert torch.equal(out[observed], x[observed])
    assert out.min() >= 0 and out.max() < K


@pytest.mark.parametrize("name", COVERED)
def test_input_checks(name):
    image_shape, K = (1, 2, 3), 2
    model = build(name, image_shape, K)
    good = random_images(2, image_shape, K)
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(good[0])  # no batch dimension
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(torch.zeros(2, 1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        model.log_prob(good.float())
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        model.log_prob(good + 1)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        model.log_prob(good - 1)
    with pytest.raises(ValueError, match="observed"):
        model.complete(good, torch.ones(2, 1, 2, 3))  # not bool


@pytest.mark.parametrize("name", COVERED)
def test_purification_stays_in_its_window_on_both_paths(name):
    """PixelDefend's policy: each value becomes the most likely one within +-radius of the input's."""
    from pixelchain.decode import MostLikelyInWindow

    image_shape, K = (3, 3, 2), max((VARIANTS.get(name) or TINY[name])[-1])
    model = build(name, image_shape, K)
    x = random_images(2, image_shape, K)
    cached = decode(model, x, MostLikelyInWindow(x, 1))
    naive = decode(model, x, MostLikelyInWindow(x, 1), naive=True)
    assert torch.equal(cached, naive)
    assert (cached - x).abs().max() <= 1
    assert torch.equal(decode(model, x, MostLikelyInWindow(x, 0)), x)  # radius 0 changes nothing


def test_an_fvsbn_is_separate_logistic_regressions_one_row_each():
    """Splicing the rows of two FVSBNs mixes their conditionals pixel by pixel and nothing else
    (benchmarks/fvsbn_per_pixel.py builds its model so)."""
    torch.manual_seed(0)
    first, second = (pc.create("fvsbn", (1, 4, 4), 2) for _ in range(2))
    for model in (first, second):
        with torch.no_grad():
            model.linear.weight.normal_()
            model.linear.bias.normal_()
    take = torch.rand(16) < 0.5  # raster order: row d of W and b belongs to pixel d
    spliced = pc.create("fvsbn", (1, 4, 4), 2)
    with torch.no_grad():
        for name in ("weight", "bias"):
            mixed = torch.where(take.view(-1, *[1] * (getattr(first.linear, name).ndim - 1)),
                                getattr(second.linear, name), getattr(first.linear, name))
            getattr(spliced.linear, name).copy_(mixed)
    x = torch.randint(0, 2, (32, 1, 4, 4))
    per_pixel = [m.raster(m.log_prob_map(x)) for m in (first, second, spliced)]
    torch.testing.assert_close(per_pixel[2], torch.where(take, per_pixel[1], per_pixel[0]))
    assert not torch.allclose(per_pixel[0], per_pixel[1])


@pytest.mark.parametrize("image_shape,K", LARGER)
@pytest.mark.parametrize("name", DENSITY_MODELS)
def test_every_parameter_receives_a_gradient(name, image_shape, K):
    """No dead weights: each parameter gets a non-zero gradient of log p(x) (DDP requires it, and
    the parameter count means what it says)."""
    model = build(name, image_shape, K).train()
    x = random_images(4, image_shape, K)
    (-model.log_likelihood(model(x), x).sum()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{name}: parameters without gradient: {dead}"
