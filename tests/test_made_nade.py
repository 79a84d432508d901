"""What MADE and NADE promise beyond the shared properties."""

import itertools
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pixelchain as pc
from pixelchain.decode import NaiveDecoder, decode


def enumerate_images(shape, K):
    return torch.tensor(list(itertools.product(range(K), repeat=math.prod(shape)))).view(-1, *shape)


def randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.double().eval()


def test_made_ensemble_is_normalised_and_a_mean_of_likelihoods():
    torch.manual_seed(0)
    model = randomised(pc.create("made", (1, 2, 3), 2, hidden=(12,), num_masks=3, order_agnostic=True))
    every = enumerate_images((1, 2, 3), 2)
    with torch.no_grad():
        ensemble = model.log_prob(every)
        per_mask = [model.member(m).log_prob(every) for m in range(3)]
    assert abs(ensemble.exp().sum().item() - 1) < 1e-9
    mean_of_likelihoods = torch.stack(per_mask).exp().mean(0).log()
    torch.testing.assert_close(ensemble, mean_of_likelihoods)
    for single in per_mask:  # each mask alone is a normalised autoregressive model too
        assert abs(single.exp().sum().item() - 1) < 1e-9


def test_made_ensemble_conditionals_are_the_mixtures():
    """Masks sharing one order: log_prob_map gives the mixture's conditionals (normalised, autoregressive,
    summing to log_prob), and the decoders condition on exactly those."""
    torch.manual_seed(0)
    model = randomised(pc.create("made", (1, 2, 3), 3, hidden=(12,), num_masks=4))
    every = enumerate_images((1, 2, 3), 3)
    with torch.no_grad():
        maps = model.raster(model.log_prob_map(every))
        torch.testing.assert_close(maps.sum(1), model.log_prob(every))
        for d in range(6):  # normalised: over the values of d, the others held
            alternatives = [model.raster(model.log_prob_map(every.view(-1, 6).index_fill(1, torch.tensor([d]), v)
                                                            .view(-1, 1, 2, 3)))[:, d] for v in range(3)]
            torch.testing.assert_close(torch.stack(alternatives).logsumexp(0), torch.zeros(len(every),
                                                                                            dtype=torch.float64))
            later = every.view(-1, 6).clone()  # autoregressive: dimensions after d do not change it
            later[:, d + 1:] = (later[:, d + 1:] + 1) % 3
            torch.testing.assert_close(model.raster(model.log_prob_map(later.view(-1, 1, 2, 3)))[:, d], maps[:, d])
        x = every[::37]
        for naive in (False, True):  # decoding x itself: each conditional, at x's value, is the map's
            seen = []

            def keep(log_probs, c, h, w, seen=seen):
                seen.append(log_probs.gather(1, x[:, c, h, w, None]).squeeze(1))
                return x[:, c, h, w]

            assert torch.equal(decode(model, x, keep, naive=naive), x)
            torch.testing.assert_close(torch.stack(seen, 1), model.raster(model.log_prob_map(x)))


def test_made_ensemble_in_different_orders_refuses_what_it_cannot_compute():
    model = randomised(pc.create("made", (1, 2, 2), 2, hidden=(8,), num_masks=3, order_agnostic=True))
    x = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    for call in (lambda: model.log_prob_map(x), lambda: model.complete(x, x == 0), lambda: model.purify(x, 1)):
        with pytest.raises(ValueError, match="different orders"):
            call()
    samples = model.sample(200, generator=torch.Generator().manual_seed(0))  # exact: a member per image
    every = enumerate_images((1, 2, 2), 2)
    counts = (samples.view(-1, 1, 4) == every.view(1, -1, 4)).all(2).sum(0).double()
    expected = model.log_prob(every).exp() * 200
    assert ((counts - expected) ** 2 / expected).sum() < 45  # chi-square, 15 degrees of freedom: p < 1e-4


def test_made_order_agnostic_decodes_in_its_own_order():
    torch.manual_seed(0)
    ensemble = randomised(pc.create("made", (1, 3, 3), 3, hidden=(20, 20), num_masks=2, order_agnostic=True))
    model = ensemble.member(1)  # a MADE in its own (non-raster) order
    order = model.decoding_order()
    assert sorted(order) == sorted((0, h, w) for h in range(3) for w in range(3))
    assert order != sorted(order)  # a non-raster order, so this test means something
    x = torch.randint(0, 3, (2, 1, 3, 3))
    with torch.no_grad():
        for step, (c, h, w) in enumerate(order):
            changed = x.clone()
            for cc, hh, ww in order[step:]:
                changed[:, cc, hh, ww] = (changed[:, cc, hh, ww] + 1) % 3
            torch.testing.assert_close(NaiveDecoder(model, changed).conditional(step, c, h, w),
                                       NaiveDecoder(model, x).conditional(step, c, h, w))
    for sampled in (model, ensemble):  # the ensemble decodes each image in its member's order
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert torch.equal(sampled.sample(4, generator=g1), sampled.sample(4, generator=g2, naive=True))


def test_made_masked_weights_keep_training_when_the_mask_changes():
    torch.manual_seed(0)
    model = pc.create("made", (1, 3, 3), 2, hidden=(16,), num_masks=4).train()
    assert model.name == "made_ensemble"
    first = model.layers[0]
    off_in_mask_0 = model.member(0).layers[0].mask == 0
    before = first.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 2, (8, 1, 3, 3))
    for _ in range(8):  # cycles through all four masks
        loss = -model.log_likelihood(model(x), x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = (first.weight.detach() != before) & off_in_mask_0
    assert changed.any(), "weights masked in mask 0 must still learn under the other masks"
    assert torch.equal(first.weight.detach()[off_in_mask_0] != 0, torch.ones_like(changed[off_in_mask_0]))


class CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_in_forward(name, shape, **hparams):
    model = pc.create(name, shape, 2, **hparams)
    x = torch.zeros(2, *shape, dtype=torch.long)
    with CountOps() as counter:
        model(x)
    return counter.count


def test_nade_and_made_passes_have_no_loop_over_dimensions(monkeypatch):
    """MADE's teacher-forced pass runs the same number of torch operations for 6 or 784 dims (with
    its masked products dense: blocked, they take at most 16 products, see test_masked_linear);
    NADE's a fixed few per block of NADEParams.DIM_BLOCK dims (no per-dimension work)."""
    from pixelchain import layers
    from pixelchain.models.nade import NADEParams

    def per_block(k):
        monkeypatch.setattr(NADEParams, "DIM_BLOCK", k)
        one, two = ops_in_forward("nade", (1, 1, k), hidden=8), ops_in_forward("nade", (1, 2, k), hidden=8)
        assert ops_in_forward("nade", (1, 28, 28), hidden=8) == one + (28 * 28 // k - 1) * (two - one)
        return two - one

    assert per_block(4) == per_block(8) == per_block(16)  # nothing inside a block is per dimension
    monkeypatch.setattr(layers, "prefix_blocks", lambda mask: None)
    assert ops_in_forward("made", (1, 2, 3), hidden=(8,)) == ops_in_forward("made", (1, 28, 28), hidden=(8,))


def test_nade_k_way_matches_explicit_loop():
    """The vectorised pass equals the textbook loop over dimensions."""
    torch.manual_seed(0)
    model = randomised(pc.create("nade", (1, 2, 3), 4, hidden=5))
    x = torch.randint(0, 4, (3, 1, 2, 3))
    v = model.raster(model.unit(x))
    expected = []
    for d in range(model.num_dims):
        h = torch.sigmoid(model.c + v[:, :d] @ model.W[:d])
        logits = h @ model.V[d].t() + model.b[d]
        expected.append(logits.log_softmax(-1).gather(1, model.raster(x)[:, d : d + 1]).squeeze(1))
    torch.testing.assert_close(model.log_prob(x), torch.stack(expected, 1).sum(1))


def nade_reference(v, W, c, V, b):
    """NADE's parameters by plain autograd ops: params [B, D, p] for inputs v [B, D]."""
    terms = v.unsqueeze(-1) * W  # [B, D, H]
    h = torch.sigmoid(c + terms.cumsum(1) - terms)  # exclusive prefix sums
    return torch.einsum("bdh,dph->bdp", h, V) + b


def test_nade_custom_backward_matches_autograd(monkeypatch):
    """Exact gradients (gradcheck in float64, D not a multiple of the block); in float32 the
    parameters and gradients agree with the float64 autograd reference to float32 precision, for
    binary and real inputs, one and several outputs per dim."""
    from pixelchain.models.nade import NADEParams

    torch.manual_seed(0)
    v = torch.rand(5, 7, dtype=torch.float64)
    params = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((7, 4), (4,), (7, 3, 4), (7, 3))]
    assert torch.autograd.gradcheck(lambda W, c, V, b: NADEParams.apply(v, W, c, V, b), params)
    monkeypatch.setattr(NADEParams, "DIM_BLOCK", 4)
    for v, p in [(torch.randint(0, 2, (16, 98)).float(), 1), (torch.rand(16, 98), 3)]:
        params = [t.requires_grad_() for t in (torch.randn(98, 50) * 0.3, torch.randn(50), torch.randn(98, p, 50) * 0.3,
                                                torch.randn(98, p))]
        weights = torch.randn(16, 98, p)
        ours = NADEParams.apply(v, *params)
        ours_grads = torch.autograd.grad((ours * weights).sum(), params)
        exact = [t.detach().double().requires_grad_() for t in params]
        reference = nade_reference(v.double(), *exact)
        reference_grads = torch.autograd.grad((reference * weights.double()).sum(), exact)
        for got, want in zip([ours.detach(), *ours_grads], [reference.detach(), *reference_grads], strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_single_mask_made_skips_masked_out_weights_and_matches_the_dense_product(monkeypatch):
    """One mask in raster order: hidden units sorted by degree, so every masked product (and the
    direct connections) runs by blocks; its parameters and gradients equal the dense product's."""
    from pixelchain import layers

    torch.manual_seed(0)
    model = randomised(pc.create("made", (1, 16, 16), 3, hidden=(256, 192), direct=True))
    assert all(layer.blocks() is not None for layer in [*model.layers, model.direct])
    x = torch.randint(0, 3, (5, 1, 16, 16))

    def params_and_grads():
        model.zero_grad()
        params = model(x)
        (params * torch.linspace(-1, 1, params.numel(), dtype=params.dtype).view_as(params)).sum().backward()
        return params.detach(), [p.grad.clone() for p in model.parameters()]

    blocked, blocked_grads = params_and_grads()
    monkeypatch.setattr(layers, "prefix_blocks", lambda mask: None)
    for layer in [*model.layers, model.direct]:
        layer.mask.add_(0)  # a new mask version: blocks are looked up again
    dense, dense_grads = params_and_grads()
    assert model.layers[0].blocks() is None
    torch.testing.assert_close(blocked, dense)
    for got, want in zip(blocked_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_an_order_agnostic_ensemble_trains_from_the_command_line(tmp_path, capsys):
    from pixelchain.cli import main

    main(["train", "made", "--dataset", "digits", "--set", "hidden=(16,)", "--set", "num_masks=2", "--set",
          "order_agnostic=True", "--run-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert (tmp_path / "run" / "samples.png").is_file() and not (tmp_path / "run" / "completions.png").exists()


def test_made_num_masks_chooses_the_ensemble_and_earlier_files_load(tmp_path):
    """``made`` with num_masks (configs written when MADE held its ensemble): 1 is MADE, M > 1 the
    ensemble, anything else a one-line error; their files (degrees [1, D], a mask index) load."""
    from pixelchain.models.made import MADE, MADEEnsemble

    assert type(pc.create("made", (1, 2, 3), 2, hidden=(8,), num_masks=1)) is MADE
    ensemble = randomised(pc.create("made", (1, 2, 3), 2, hidden=(8,), num_masks=3))
    assert type(ensemble) is MADEEnsemble and ensemble.name == "made_ensemble"
    with pytest.raises(ValueError, match="num_masks must be a positive integer"):
        pc.create("made", (1, 2, 3), 2, num_masks=0)
    x = torch.randint(0, 2, (4, 1, 2, 3))
    single = randomised(pc.create("made", (1, 2, 3), 2, hidden=(8,)))
    for model, fresh in ((single, pc.create("made", (1, 2, 3), 2, hidden=(8,), seed=1)),
                         (ensemble, pc.create("made_ensemble", (1, 2, 3), 2, hidden=(8,), num_masks=3, seed=1))):
        earlier = dict(model.state_dict())
        if "next_member" in earlier:
            earlier["mask_index"] = earlier.pop("next_member")
        else:
            earlier = {k: v.unsqueeze(0) if k.endswith("_degree") else v for k, v in earlier.items()}
            earlier["mask_index"] = torch.zeros((), dtype=torch.long)
        fresh.double().eval().load_state_dict(earlier)
        torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x))


def test_an_ensemble_member_saved_alone_is_that_made(tmp_path):
    """member(m) is a MADE like any other: saved alone, it loads with member m's order and
    likelihood (its degrees travel with its weights)."""
    ensemble = randomised(pc.create("made_ensemble", (1, 3, 3), 2, hidden=(12,), num_masks=3, order_agnostic=True))
    member = ensemble.member(2)
    pc.save(member, tmp_path / "member")
    loaded = pc.load(tmp_path / "member").double()
    x = torch.randint(0, 2, (6, 1, 3, 3))
    assert loaded.name == "made" and loaded.decoding_order() == member.decoding_order()
    torch.testing.assert_close(loaded.log_prob(x), member.log_prob(x))
    assert not torch.allclose(ensemble.member(0).log_prob(x), member.log_prob(x))
