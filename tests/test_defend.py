"""PixelDefend: p-values, AUROC, purification through the decoding loop, attacks, the CLI."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import pixelchain as pc
from pixelchain import attacks, defend
from pixelchain.heads import argmax_in_window


def density(image_shape=(1, 5, 4), K=16, name="gated_pixelcnn", seed=0):
    """A tiny density model with random, peaked weights (no property holds by accident of the init)."""
    hparams = {"gated_pixelcnn": {"channels": 6, "num_layers": 3, "kernel_size": 3, "head_channels": 6},
               "pixelcnn_pp": {"channels": 6, "num_resnet": 1, "num_mixtures": 2, "num_scales": 2}}[name]
    torch.manual_seed(seed)
    model = pc.create(name, image_shape, K, **hparams).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def images(n, image_shape=(1, 5, 4), K=16, seed=1):
    return torch.randint(0, K, (n, *image_shape), generator=torch.Generator().manual_seed(seed))


def test_p_values_count_reference_images_at_least_as_unlikely_ties_included():
    reference = torch.tensor([1.0, 2.0, 2.0, 3.0])
    p = defend.p_values(torch.tensor([2.0, 0.5, 3.5, 3.0]), reference)
    torch.testing.assert_close(p, torch.tensor([4 / 5, 5 / 5, 1 / 5, 2 / 5], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    ref, x = torch.randint(0, 20, (300,), generator=g).double(), torch.randint(0, 20, (50,), generator=g).double()
    brute = torch.tensor([(1 + (ref >= b).sum().item()) / 301 for b in x], dtype=torch.float64)
    torch.testing.assert_close(defend.p_values(x, ref), brute)
    with pytest.raises(ValueError, match="reference"):
        defend.p_values(x, torch.zeros(0))


def test_auroc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    clean, attacked = torch.randint(0, 10, (200,), generator=g), torch.randint(3, 13, (150,), generator=g)
    labels = np.r_[np.zeros(200), np.ones(150)]
    expected = roc_auc_score(labels, np.r_[clean.numpy(), attacked.numpy()])
    assert defend.auroc(clean, attacked) == pytest.approx(expected, abs=1e-12)
    assert defend.auroc(torch.zeros(3), torch.ones(4)) == 1.0


def test_threshold_keeps_the_false_alarm_rate_on_clean_images():
    p = defend.p_values(torch.rand(500, generator=torch.Generator().manual_seed(0)),
                        torch.rand(1000, generator=torch.Generator().manual_seed(1)))
    t = defend.choose_threshold(p, 0.05)
    assert (p <= t).double().mean() <= 0.05
    assert (p <= p[p > t].min()).double().mean() > 0.05  # the next candidate would exceed it
    assert defend.choose_threshold(p, 0.0) == 0.0


@pytest.mark.parametrize("image_shape", [(1, 5, 4), (3, 3, 3)])
@pytest.mark.parametrize("name", ["gated_pixelcnn", "pixelcnn_pp"])
def test_purification_picks_the_window_argmax_of_the_input_given_purified_pixels(name, image_shape):
    model, K, eps = density(image_shape, name=name), 16, 3
    x = images(6, image_shape, K)

    def check(purified):
        """Each value is a window argmax of its conditional given the purified pixels before it: the
        teacher-forced one of the final purified image. The random, peaked PixelCNN++ puts almost
        all its mass on the edge bins and leaves the interior ones equal to ~1e-14, so there a tie
        is broken by rounding: any value within 1e-9 of the window's maximum is one."""
        assert purified.dtype == torch.long and ((purified - x).abs() <= eps).all()
        with torch.no_grad():
            params = model(purified)
        for c, h, w in model.decoding_order():
            log_probs = model.head.conditional(params[:, :, h, w], purified[:, :, h, w], c)
            best = log_probs.gather(1, argmax_in_window(log_probs, x[:, c, h, w], eps)[:, None])[:, 0]
            chosen = log_probs.gather(1, purified[:, c, h, w, None])[:, 0]
            torch.testing.assert_close(chosen, best, rtol=0, atol=1e-9)

    purified = defend.purify(model, x, eps, batch_size=4, progress=False)
    check(purified)
    assert (purified != x).any()  # random weights: the window argmax is seldom the input's value
    # the same in one batch and with the reference (naive) decoder; PixelCNN++'s ties may break otherwise
    for naive in (False, True):
        other = defend.purify(model, x, eps, naive=naive, progress=False)
        check(other)
        if name != "pixelcnn_pp":
            torch.testing.assert_close(other, purified)
    torch.testing.assert_close(defend.purify(model, x, 0, progress=False), x)


def test_rgb_detect_and_purify():
    """Sub-pixel order R -> G -> B: a synthetic 3-channel set detects and purifies like greyscale."""
    model, K = density((3, 4, 4), K=8), 8
    reference = model.sample(40, generator=torch.Generator().manual_seed(0))
    x = torch.cat([model.sample(10, generator=torch.Generator().manual_seed(1)), images(10, (3, 4, 4), K)])
    bpd, ref = defend.bits_per_dim(model, x, progress=False), defend.bits_per_dim(model, reference, progress=False)
    torch.testing.assert_close(bpd, model.bits_per_dim(x).detach())
    p = defend.p_values(bpd, ref)
    assert p.shape == (20,) and ((p > 0) & (p <= 1)).all()
    assert p[10:].mean() < p[:10].mean()  # uniform noise is less likely than the model's samples
    purified = defend.purify(model, x, 2, batch_size=7, progress=False)
    assert ((purified - x).abs() <= 2).all()
    assert (defend.bits_per_dim(model, purified, progress=False) <= bpd + 1e-9).float().mean() > 0.8


def test_adaptive_purification_leaves_typical_images_unchanged():
    model, K = density((1, 8, 8), K=16), 16  # 64 dimensions: bits/dim concentrate
    reference = defend.bits_per_dim(model, model.sample(200, generator=torch.Generator().manual_seed(0)),
                                    progress=False)
    typical = model.sample(20, generator=torch.Generator().manual_seed(1))
    x = torch.cat([typical, images(20, (1, 8, 8), K=K)])
    t = defend.choose_threshold(defend.p_values(reference, reference), 0.05)
    out, touched = defend.adaptive_purify(model, x, 4, reference, t, progress=False)
    p = defend.p_values(defend.bits_per_dim(model, x, progress=False), reference)
    assert torch.equal(touched, p <= t)
    assert torch.equal(out[~touched], x[~touched])
    assert torch.equal(out[touched], defend.purify(model, x[touched], 4, progress=False))
    assert touched[20:].all() and touched[:20].double().mean() <= 0.2  # noise is purified, samples mostly not


def test_bad_input_is_refused_with_the_reason():
    model = density()
    x = images(2)
    with pytest.raises(ValueError, match="shape"):
        defend.purify(model, images(2, (1, 4, 4)), 2)
    with pytest.raises(ValueError, match="values must lie"):
        defend.purify(model, x + 16, 2)
    with pytest.raises(ValueError, match="integer levels"):
        defend.bits_per_dim(model, x.double())
    with pytest.raises(ValueError, match="eps"):
        defend.purify(model, x, -1)
    for eps in (1.5, float("nan"), "3"):
        with pytest.raises(ValueError, match="eps"):
            defend.purify(model, x, eps)
    classifier = pc.classifiers.create("logistic_regression", (1, 5, 4), 256)
    with pytest.raises(ValueError, match="must match"):
        defend.check_pair(classifier, model)
    with pytest.raises(ValueError, match="not a density model"):
        defend.purify(classifier, x, 2)
    with pytest.raises(ValueError, match="eps"):
        attacks.attack(classifier, x, torch.zeros(2, dtype=torch.long), "fgsm", -3)
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.attack(classifier, x, torch.zeros(2, dtype=torch.long), "pgd-42", 3)


def trained_logistic_regression(K=16):
    from test_classifiers import toy_set

    data = toy_set(K=K)
    torch.manual_seed(0)
    clf = pc.classifiers.create("logistic_regression", data.image_shape, K, num_classes=2)
    pc.fit(clf, data, epochs=3, batch_size=16, lr=0.05, progress=False)
    return clf.eval(), data


def per_image_loss(clf, x, y):
    with torch.no_grad():
        return -clf.log_prob(x, y)


def test_fgsm_through_art_round_trip():
    pytest.importorskip("art")
    clf, data = trained_logistic_regression()
    x, y, eps = data.images[:32], data.labels[:32], 2
    threads = torch.get_num_threads()
    x_adv = attacks.attack(clf, x, y, "fgsm", eps)
    assert torch.get_num_threads() == threads  # the one-thread setting is restored
    assert x_adv.dtype == torch.long and x_adv.min() >= 0 and x_adv.max() < data.num_levels
    assert ((x_adv - x).abs() <= eps).all()
    interior = (x >= eps) & (x < data.num_levels - eps)
    assert ((x_adv - x).abs()[interior] == eps).float().mean() > 0.9  # a full signed step, rounded exactly
    # the loss is convex in the input: a step along the gradient's sign can only raise it
    assert (per_image_loss(clf, x_adv, y) >= per_image_loss(clf, x, y) - 1e-6).all()
    noise = attacks.attack(clf, x, y, "random", eps, generator=torch.Generator().manual_seed(0))
    assert ((noise - x).abs() <= eps).all() and (noise != x).any()


def test_pgd_through_art_finds_the_worst_corner_and_is_seeded():
    pytest.importorskip("art")
    clf, data = trained_logistic_regression()
    x, y, eps = data.images[:32], data.labels[:32], 2
    state = np.random.get_state()
    x_pgd = attacks.attack(clf, x, y, "pgd", eps, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global generator is left as it was
    assert ((x_pgd - x).abs() <= eps).all() and x_pgd.min() >= 0 and x_pgd.max() < data.num_levels
    again = attacks.attack(clf, x, y, "pgd", eps, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_pgd, again)  # the random start comes from the generator
    # two-class logistic regression: the loss's input gradient has one sign pattern, so PGD from any
    # start walks to the same corner of the ball as FGSM's single step, the loss's maximum there
    x_fgsm = attacks.attack(clf, x, y, "fgsm", eps)
    assert (per_image_loss(clf, x_pgd, y) >= per_image_loss(clf, x_fgsm, y) - 1e-5).all()
    assert (per_image_loss(clf, x_pgd, y) > per_image_loss(clf, x, y)).all()


def test_cli_detect_and_purify(tmp_path, capsys):
    from pixelchain.cli import main

    model = density((3, 4, 4), K=8)
    pc.save(model.float(), tmp_path / "model")
    reference = model.sample(30, generator=torch.Generator().manual_seed(0)).numpy().astype(np.uint8)
    x = images(5, (3, 4, 4), 8).numpy().astype(np.uint8)
    np.save(tmp_path / "ref.npy", reference)
    np.save(tmp_path / "x.npy", x)
    main(["detect", str(tmp_path / "model"), str(tmp_path / "x.npy"), "--reference", str(tmp_path / "ref.npy"),
          "--out", str(tmp_path / "detect"), "--device", "cpu"])
    lines = (tmp_path / "detect" / "p_values.csv").read_text().splitlines()
    assert lines[0] == "index,bits_per_dim,score,p_value" and len(lines) == 6
    assert all(0 < float(line.split(",")[3]) <= 1 for line in lines[1:])
    assert (tmp_path / "detect" / "bits_per_dim.png").is_file()
    main(["purify", str(tmp_path / "model"), str(tmp_path / "x.npy"), "--eps", "2", "--out", str(tmp_path / "pure"),
          "--device", "cpu"])
    purified = np.load(tmp_path / "pure" / "purified.npy")
    assert purified.shape == x.shape and purified.dtype == np.uint8
    assert (np.abs(purified.astype(int) - x) <= 2).all()
    assert (tmp_path / "pure" / "before_after.png").is_file()
    assert "purified 5 images" in capsys.readouterr().out
    np.save(tmp_path / "mixed.npy", np.concatenate([reference[:5], x]))
    main(["purify", str(tmp_path / "model"), str(tmp_path / "mixed.npy"), "--eps", "2", "--out", str(tmp_path / "ad"),
          "--adaptive", "0.1", "--reference", str(tmp_path / "ref.npy"), "--device", "cpu"])
    assert "adaptive: p <= " in capsys.readouterr().out
    adaptive = np.load(tmp_path / "ad" / "purified.npy")
    assert (np.abs(adaptive.astype(int) - np.load(tmp_path / "mixed.npy")) <= 2).all()
    with pytest.raises(SystemExit):  # levels beyond the model's 8: a clear error, exit 1
        np.save(tmp_path / "bad.npy", x.astype(np.int64) + 8)
        main(["purify", str(tmp_path / "model"), str(tmp_path / "bad.npy"), "--out", str(tmp_path / "p2")])
    # what a run wrote is kept: the same --out again is a one-line error before any work, --force replaces it
    outputs = (tmp_path / "pure" / "purified.npy", tmp_path / "detect" / "p_values.csv")
    written = {path: path.read_bytes() for path in outputs}
    capsys.readouterr()
    for argv in (["purify", str(tmp_path / "model"), str(tmp_path / "mixed.npy"), "--eps", "2", "--out",
                  str(tmp_path / "pure")],
                 ["detect", str(tmp_path / "model"), str(tmp_path / "mixed.npy"), "--reference",
                  str(tmp_path / "ref.npy"), "--out", str(tmp_path / "detect")]):
        with pytest.raises(SystemExit) as done:
            main([*argv, "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 1 and len(err) == 1 and "exists" in err[0] and "--force" in err[0], err
        assert all(path.read_bytes() == before for path, before in written.items())
    main(["purify", str(tmp_path / "model"), str(tmp_path / "mixed.npy"), "--eps", "2", "--out", str(tmp_path / "pure"),
          "--device", "cpu", "--force"])
    assert np.load(tmp_path / "pure" / "purified.npy").shape == np.load(tmp_path / "mixed.npy").shape


def test_cli_attack_then_purify_reports_accuracy(tmp_path, capsys):
    pytest.importorskip("art")
    from pixelchain.cli import main

    clf, data = trained_logistic_regression()
    model = density(data.image_shape, K=data.num_levels)
    pc.save(clf, tmp_path / "clf")
    pc.save(model.float(), tmp_path / "model")
    np.save(tmp_path / "x.npy", data.images[:24].numpy().astype(np.uint8))
    np.save(tmp_path / "y.npy", data.labels[:24].numpy())
    main(["attack", str(tmp_path / "clf"), str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
          "--method", "fgsm", "--eps", "2", "--out", str(tmp_path / "adv"), "--device", "cpu"])
    printed = capsys.readouterr().out
    x_adv, x = np.load(tmp_path / "adv" / "adversarial.npy"), data.images[:24].numpy()
    assert x_adv.dtype == np.uint8 and x_adv.shape == (24, *data.image_shape)
    assert (np.abs(x_adv.astype(int) - x) <= 2).all() and (x_adv != x).any()
    np.testing.assert_array_equal(np.load(tmp_path / "adv" / "labels.npy"), data.labels[:24].numpy())
    clean, attacked = defend.accuracy(clf, data.images[:24], data.labels[:24]), defend.accuracy(
        clf, torch.from_numpy(x_adv).long(), data.labels[:24])
    assert f"accuracy {clean:.2%} -> {attacked:.2%}" in printed
    adv, labels = str(tmp_path / "adv" / "adversarial.npy"), str(tmp_path / "adv" / "labels.npy")
    main(["purify", str(tmp_path / "model"), adv, "--eps", "1", "--out", str(tmp_path / "pure"),
          "--classifier", str(tmp_path / "clf"), "--labels", labels, "--device", "cpu"])
    purified = torch.from_numpy(np.load(tmp_path / "pure" / "purified.npy")).long()
    after = defend.accuracy(clf, purified, data.labels[:24])
    assert f"accuracy {attacked:.2%} before purification, {after:.2%} after" in capsys.readouterr().out
    # clear errors, exit 1: no labels for a .npy, a density model where a classifier is needed, wrong label count
    np.save(tmp_path / "five.npy", data.labels[:5].numpy())
    for argv, message in [
        (["attack", str(tmp_path / "clf"), adv], "pass --labels"),
        (["attack", str(tmp_path / "model"), adv, "--labels", labels], "is a density model"),
        (["purify", str(tmp_path / "model"), adv, "--classifier", str(tmp_path / "clf"), "--labels",
          str(tmp_path / "five.npy")], "expected labels of shape [24]"),
    ]:
        with pytest.raises(SystemExit):
            main(argv + ["--out", str(tmp_path / "unused"), "--device", "cpu"])
        assert message in capsys.readouterr().err


def test_read_images_from_a_split_a_png_folder_and_npy(tmp_path):
    from PIL import Image

    from pixelchain.cli import read_images

    digits = pc.data.load("digits", "test").images
    torch.testing.assert_close(read_images("digits:test[2:5]", 1), digits[2:5])
    rgb = images(3, (3, 4, 5), 256).numpy().astype(np.uint8)
    for i, img in enumerate(rgb):
        Image.fromarray(img.transpose(1, 2, 0)).save(tmp_path / f"{i}.png")
    torch.testing.assert_close(read_images(str(tmp_path), 3), torch.from_numpy(rgb).long())
    np.save(tmp_path / "grey.npy", rgb[:, 0])
    assert read_images(str(tmp_path / "grey.npy"), 1).shape == (3, 1, 4, 5)
    np.save(tmp_path / "float.npy", rgb.astype(np.float32))
    with pytest.raises(ValueError, match="integer"):
        read_images(str(tmp_path / "float.npy"), 3)
    with pytest.raises(ValueError, match="NAME:SPLIT"):
        read_images("no such thing", 1)


def test_correct_marks_each_image_and_accuracy_is_its_mean():
    """defend.correct: per image, whether the classifier's label is the true one; accuracy is its mean,
    whatever the batch size."""
    clf, data = trained_logistic_regression()
    x, y = data.images[:37], data.labels[:37].clone()
    right = defend.correct(clf, x, y, batch_size=8)
    assert right.dtype == torch.bool and right.shape == (37,)
    assert torch.equal(right, clf.predict(x) == y)
    y[right] = (y[right] + 1) % clf.num_classes  # every right label made wrong
    assert not defend.correct(clf, x, y, batch_size=5).any()
    assert defend.accuracy(clf, x, data.labels[:37], batch_size=3) == right.sum().item() / 37
