"""Adaptive attacks on PixelDefend (pixelchain.adaptive) with tiny models: the BPDA and surrogate
gradients through ART, the eps-ball, and the worst case over iterates and restarts."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_defend import density, trained_logistic_regression

import pixelchain as pc
from pixelchain import adaptive, defend

pytest.importorskip("art")
EPS, EPS_DEF = 4, 2


@pytest.fixture(scope="module")
def setup():
    clf, data = trained_logistic_regression()
    model = density(data.image_shape, K=data.num_levels, name="pixelcnn_pp")  # float64: its random, peaked
    # scales underflow the mixture's bin masses in float32 (the trained model's do not)
    return clf, model, data.images[:16], data.labels[:16], data.num_levels


class Recording:
    """A defence that remembers every image it was asked to defend."""

    def __init__(self, defence):
        self.defence, self.seen = defence, []

    def __call__(self, x):
        self.seen.append(x.clone())
        return self.defence(x)


def purifier(model):
    return partial(defend.purify, model, eps=EPS_DEF, progress=False)


def onehot(y, n=2):
    return np.eye(n, dtype=np.float32)[y.numpy()]


def test_bpda_gradient_is_the_classifiers_at_the_purified_image(setup):
    clf, model, x, y, K = setup
    defended = adaptive.Defended(purifier(model), clf)
    pre = adaptive.preprocessor(defended, "identity")
    est = adaptive.estimator(clf, pre)
    assert est.preprocessing_operations == [pre]  # ART's rule: a numpy preprocessor stands alone
    grad = est.loss_gradient((x.double() / (K - 1)).numpy().astype(np.float32), onehot(y))
    purified = defend.purify(model, x, EPS_DEF, progress=False)
    assert (purified != x).any()  # the purifier did something, so the test can tell where the gradient was taken
    u = (purified.float() / (K - 1)).requires_grad_()
    expected = torch.autograd.grad(F.cross_entropy(clf.logits_from_unit(u), y), u)[0]
    torch.testing.assert_close(torch.from_numpy(grad), expected)
    predicted = est.predict((x.double() / (K - 1)).numpy().astype(np.float32)).argmax(1)
    np.testing.assert_array_equal(predicted, clf.predict(purified).numpy())


def test_surrogate_forward_is_the_purifier_gradient_the_smooth_purifiers(setup):
    clf, model, x, y, K = setup
    defended = adaptive.Defended(purifier(model), clf)
    est = adaptive.estimator(clf, adaptive.preprocessor(defended, "surrogate", model, EPS_DEF, temperature=0.5))
    u = (x.double() / (K - 1)).numpy().astype(np.float32)
    purified = defend.purify(model, x, EPS_DEF, progress=False)
    np.testing.assert_array_equal(est.predict(u).argmax(1), clf.predict(purified).numpy())
    grad = est.loss_gradient(u, onehot(y))
    v = torch.from_numpy(u).requires_grad_()
    levels = v.double() * (K - 1)
    prefix = purified.double() + levels - levels.detach()  # the purified image, with the identity's gradient
    soft = adaptive.smooth_purify(model, levels, EPS_DEF, 0.5, prefix=prefix).float() / (K - 1)
    straight_through = purified.float() / (K - 1) + soft - soft.detach()
    expected = torch.autograd.grad(F.cross_entropy(clf.logits_from_unit(straight_through), y), v)[0]
    torch.testing.assert_close(torch.from_numpy(grad), expected)
    assert expected.abs().sum() > 0


def test_smooth_purifier_and_relaxed_bits_per_dim(setup):
    _, model, x, _, K = setup
    v = x.float()
    # a window of one value: the input itself (a warm softmax: the tiny model's log-probs reach -1e4);
    # a cold softmax and a sharp window: the first dimension (no prefix) is purify's argmax
    torch.testing.assert_close(adaptive.smooth_purify(model, v, 0, 1e5, softness=0.01), v, atol=1e-3, rtol=0)
    cold = adaptive.smooth_purify(model, v.double(), EPS_DEF, temperature=1e-6, softness=1e-9)
    purified = defend.purify(model, x, EPS_DEF, progress=False)
    torch.testing.assert_close(cold[:, 0, 0, 0], purified[:, 0, 0, 0].double(), atol=1e-2, rtol=0)
    # teacher-forced on the purified image, the conditionals are purification's: cold, it is purify
    # wherever the window's maximum is unique (the tiny model's bin masses tie where they underflow)
    cold = adaptive.smooth_purify(model, v.double(), EPS_DEF, 1e-6, 1e-20, prefix=purified.double())
    log_probs = adaptive.all_log_probs(model, purified.double())
    outside = (torch.arange(K) - x.unsqueeze(-1)).abs() > EPS_DEF
    top = log_probs.masked_fill(outside, -torch.inf).topk(2, -1).values
    unique = top[..., 0] - top[..., 1] > 1e-3
    assert unique.double().mean() > 0.5 and (cold.round() == purified)[unique].double().mean() > 0.98
    # relaxed bits/dim: exact at integer levels, differentiable in between
    torch.testing.assert_close(adaptive.relaxed_bits_per_dim(model, v).double(),
                               defend.bits_per_dim(model, x, progress=False), rtol=1e-5, atol=1e-4)
    w = (v + 0.3).clamp(max=K - 1).requires_grad_()
    (grad,) = torch.autograd.grad(adaptive.relaxed_bits_per_dim(model, w).sum(), w)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("attack", ["pgd-identity", "pgd-surrogate", "apgd-ce"])
def test_attacks_stay_in_the_eps_ball_and_keep_the_worst_case(setup, attack):
    clf, model, x, y, K = setup
    recording = Recording(purifier(model))
    defended = adaptive.Defended(recording, clf)
    if attack == "apgd-ce":
        result = adaptive.apgd(clf, defended, x, y, EPS, steps=4, restarts=2, progress=False)
    else:
        # a warm surrogate: the tiny model's log-probs differ by thousands of nats
        result = adaptive.pgd(clf, defended, x, y, EPS, steps=4, restarts=2, route=attack.split("-")[1], model=model,
                              eps_def=EPS_DEF, temperature=1e4, generator=torch.Generator().manual_seed(0),
                              progress=False)
    seen = torch.cat(recording.seen)
    assert seen.dtype == torch.long and seen.min() >= 0 and seen.max() < K
    distance = (seen.flatten(1).unsqueeze(1) - x.flatten(1).unsqueeze(0)).abs().amax(-1)  # [seen, N]
    probe = (seen == K - 1).flatten(1).all(1)  # ART's APGD asks the estimator about an image of ones first
    assert (distance.min(1).values[~probe] <= EPS).all()  # every image the attack evaluated lies in an eps-ball
    for images in (result.x_adv, result.last):
        assert images.dtype == torch.long and ((images - x).abs() <= EPS).all()
        assert images.min() >= 0 and images.max() < K
    # worst-case bookkeeping, recomputed from everything the defence saw: an image is robust only if
    # no image in its ball, of any iterate of any restart, was misclassified after purification
    wrong = clf.predict(defend.purify(model, seen, EPS_DEF, progress=False)).unsqueeze(1) != y.unsqueeze(0)
    torch.testing.assert_close(result.robust, ~((distance <= EPS) & wrong).any(0))
    fooled = ~result.robust
    assert 0 < fooled.sum() < len(x)  # the test sees both outcomes
    assert (clf.predict(defend.purify(model, result.x_adv[fooled], EPS_DEF, progress=False)) != y[fooled]).all()
    assert result.accuracy <= defend.accuracy(clf, defend.purify(model, result.last, EPS_DEF, progress=False), y)
    accuracy = [a for _, a in result.curve]
    assert accuracy == sorted(accuracy, reverse=True) and accuracy[-1] == result.accuracy
    steps = [s for s, _ in result.curve]
    assert steps == sorted(steps) and len(steps) > 2 + 1  # a point per step (APGD: per defence call), not per restart
    assert accuracy[0] == defend.accuracy(clf, defend.purify(model, x, EPS_DEF, progress=False), y)


def test_worst_case_counts_any_fooling_image_in_the_ball():
    x = torch.tensor([[0, 0], [10, 10], [10, 10], [20, 20]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 1, 1, 0])
    tracker = adaptive.WorstCase(x, labels, eps=2)
    tracker.observe(torch.tensor([[1, 2]]).view(1, 1, 1, 2), torch.tensor([1]))  # fools image 0
    tracker.observe(torch.tensor([[0, 1]]).view(1, 1, 1, 2), torch.tensor([0]))  # a later correct iterate
    tracker.observe(torch.tensor([[5, 5]]).view(1, 1, 1, 2), torch.tensor([1]))  # in no ball: counts for none
    tracker.observe(torch.tensor([[17, 20]]).view(1, 1, 1, 2), torch.tensor([1]))  # 3 levels away from image 3
    assert tracker.robust.tolist() == [False, True, True, True]
    assert tracker.x_adv[0].flatten().tolist() == [1, 2] and torch.equal(tracker.x_adv[1:], x[1:])
    tracker.observe(torch.tensor([[11, 9]]).view(1, 1, 1, 2), torch.tensor([0]))  # in the ball of 1 and of 2
    assert tracker.robust.tolist() == [False, False, False, True] and tracker.accuracy == 0.25


def test_defended_caches_by_content_and_reports_new_images_once(setup):
    clf, model, x, y, K = setup
    recording = Recording(purifier(model))
    tracker = adaptive.WorstCase(x, y, EPS)
    defended = adaptive.Defended(recording, clf, tracker, max_cached=20)
    a = defended(x[:8])
    b = defended(torch.cat([x[4:12], x[4:6]]))
    assert sum(len(s) for s in recording.seen) == 12  # images 8..11 were new
    torch.testing.assert_close(b, torch.cat([a[4:], defend.purify(model, x[8:12], EPS_DEF, progress=False), a[4:6]]))
    defended(x[12:16])
    defended(x[12:16])  # still cached, although 16 > max_cached - 4 left the oldest
    # a call that reads the oldest cached images and brings new ones past max_cached evicts others
    small = adaptive.Defended(purifier(model), clf, max_cached=6)
    small(x[:4])
    small(x[4:6])
    torch.testing.assert_close(small(torch.cat([x[:2], x[6:10]])),
                               defend.purify(model, torch.cat([x[:2], x[6:10]]), EPS_DEF, progress=False))
    assert sum(len(s) for s in recording.seen) == 16 and len(defended.cache) <= 20
    # a new tracker (the next attack sharing the cache) hears of cached images too
    assert (clf.predict(defend.purify(model, x, EPS_DEF, progress=False)) == y).all()
    flipped = y.clone()
    flipped[12:14] = 1 - flipped[12:14]  # labels these two images' defended versions miss
    defended.tracker = adaptive.WorstCase(x, flipped, EPS)
    defended(x[12:16])
    assert sum(len(s) for s in recording.seen) == 16
    assert defended.tracker.robust.tolist() == [True] * 12 + [False, False, True, True]


def test_bpd_limit_is_the_detectors_edge():
    reference = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 3
    for threshold in (0.02, 0.05, 0.1, 0.5):
        limit = adaptive.bpd_limit(reference, threshold)
        above = torch.nextafter(torch.tensor(limit, dtype=torch.float64), torch.tensor(np.inf, dtype=torch.float64))
        p = defend.p_values(torch.stack([torch.tensor(limit, dtype=torch.float64), above]), reference)
        assert p[0] > threshold >= p[1]


def test_detector_aware_attack_moves_few_pixels_within_the_ball(setup):
    clf, model, x, y, K = setup
    reference_bpd = defend.bits_per_dim(model, x, progress=False)
    limit = adaptive.bpd_limit(reference_bpd, 0.2)
    defended = adaptive.Defended(lambda v: defend.adaptive_purify(model, v, EPS_DEF, reference_bpd, 0.2,
                                                                  progress=False)[0], clf)
    result = adaptive.detector_aware(clf, model, defended, x, y, EPS, limit, steps=1, check_every=1, fraction=0.1,
                                     progress=False)
    moved = (result.last != x).flatten(1).sum(1)
    assert (moved <= round(0.1 * x[0].numel())).all() and moved.sum() > 0
    assert ((result.x_adv - x).abs() <= EPS).all()
    with pytest.raises(ValueError, match="fraction"):
        adaptive.detector_aware(clf, model, defended, x, y, EPS, limit, fraction=0, progress=False)


def test_cli_attack_bpda(tmp_path, capsys):
    from pixelchain.cli import main

    clf, data = trained_logistic_regression()
    model = density(data.image_shape, K=data.num_levels, name="pixelcnn_pp").float()
    pc.save(clf, tmp_path / "clf")
    pc.save(model, tmp_path / "model")
    np.save(tmp_path / "x.npy", data.images[:12].numpy().astype(np.uint8))
    np.save(tmp_path / "y.npy", data.labels[:12].numpy())
    common = [str(tmp_path / "clf"), str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--eps", "4",
              "--device", "cpu"]
    clean = defend.accuracy(clf, defend.purify(model, data.images[:12], 2, progress=False), data.labels[:12])
    for method, extra in [("bpda", ["--route", "surrogate"]), ("apgd-ce", [])]:
        out = tmp_path / method
        main(["attack", *common, "--method", method, "--purifier", str(tmp_path / "model"), "--eps-def", "2",
              "--steps", "2", "--restarts", "2", "--out", str(out), *extra])
        printed = capsys.readouterr().out
        x_adv, robust = np.load(out / "adversarial.npy"), np.load(out / "robust.npy")
        assert (np.abs(x_adv.astype(int) - data.images[:12].numpy()) <= 4).all() and robust.dtype == bool
        curve = (out / "curve.csv").read_text().splitlines()
        assert curve[0] == "step,robust_accuracy" and float(curve[-1].split(",")[1]) == pytest.approx(robust.mean())
        assert f"{robust.mean():.2%} robust" in printed
        assert f"{clean:.2%} clean" in printed
    # eps spanning every level: each image of the other class is a fooling image for every original,
    # so nothing is robust, yet the clean figure is still the clean images' own accuracy once purified
    main(["attack", *common, "--eps", "15", "--method", "apgd-ce", "--purifier", str(tmp_path / "model"),
          "--eps-def", "2", "--steps", "1", "--out", str(tmp_path / "every_level")])
    printed = capsys.readouterr().out
    assert "0.00% robust" in printed and f"{clean:.2%} clean" in printed
    for argv, message in [([], "pass --purifier"), (["--purifier", str(tmp_path / "clf")], "only density models"),
                          (["--purifier", str(tmp_path / "model"), "--steps", "0"], "expected an integer >= 1")]:
        with pytest.raises(SystemExit):
            main(["attack", *common, "--method", "bpda", "--out", str(tmp_path / "unused"), *argv])
        assert message in capsys.readouterr().err
