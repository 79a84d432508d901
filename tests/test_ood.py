"""Out-of-distribution scores: each one's direction on a tiny model fitted to known data, p-values, errors."""

import pytest
import torch

import pixelchain as pc
from pixelchain import ood
from pixelchain.defend import auroc

SHAPE, K = (1, 4, 4), 4


def skewed(n, seed, shape=SHAPE):
    """In-distribution: every value independently 0 with probability 0.7, else 1, 2 or 3."""
    g = torch.Generator().manual_seed(seed)
    zero = torch.rand(n, *shape, generator=g) < 0.7
    return torch.where(zero, 0, torch.randint(1, K, (n, *shape), generator=g))


def fitted(data, shape=SHAPE, steps=300, seed=0):
    torch.manual_seed(seed)
    model = pc.create("gated_pixelcnn", shape, K, channels=8, num_layers=2, kernel_size=3, head_channels=8)
    pc.fit(model, pc.data.ImageDataset(data, K), epochs=steps * 64 // len(data) + 1, max_steps=steps, batch_size=64,
           lr=1e-2, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return fitted(skewed(2000, 0))


@pytest.fixture(scope="module")
def reference():
    return skewed(400, 1)


def test_bpd_flags_noise_and_new_in_images_stay_uniform(model, reference):
    inn, noise = skewed(300, 2), torch.randint(0, K, (300, *SHAPE), generator=torch.Generator().manual_seed(3))
    det = ood.Detector(model, reference, "bpd")
    assert auroc(det.score(inn), det.score(noise)) > 0.9
    for score in ("bpd", "combined"):
        p = ood.Detector(model, reference, score).p_values(inn)
        assert 0.4 < float(p.mean()) < 0.6 and float((p <= 0.05).double().mean()) < 0.1  # no false alarms


def test_typicality_flags_too_likely_images_that_bpd_calls_normal(model, reference):
    zeros = torch.zeros(20, *SHAPE, dtype=torch.long)  # the most likely image, and atypical
    assert (ood.Detector(model, reference, "bpd").p_values(zeros) > 0.9).all()
    assert (ood.Detector(model, reference, "typicality").p_values(zeros) < 0.05).all()
    det = ood.Detector(model, reference, "combined", combine=("typicality", "orientation"))
    assert (det.p_values(zeros) < 0.05).all()


def test_batch_typicality(model, reference):
    ref = ood.Features(ood.nll_map(model, reference)).bpd
    same, zeros = (ood.Features(ood.nll_map(model, x)).bpd for x in (skewed(50, 4), torch.zeros(5, *SHAPE).long()))
    g = torch.Generator().manual_seed(0)
    assert ood.batch_typicality(same, ref, 2000, g) > 0.05
    assert ood.batch_typicality(zeros, ref, 2000, g) < 0.01


def test_local_and_orientation_flag_likely_values_in_unlikely_places():
    # in: the top row is always 0, the rest skewed; out: the same values with the rows flipped
    data = skewed(2000, 5)
    data[:, :, 0] = 0
    local_model = fitted(data)
    ref, inn = skewed(400, 6), skewed(300, 7)
    ref[:, :, 0] = 0
    inn[:, :, 0] = 0
    for score in ("local", "orientation", "combined"):
        det = ood.Detector(local_model, ref, score)
        assert auroc(det.score(inn), det.score(inn.flip(2))) > 0.9
    det = ood.Detector(local_model, ref, "orientation")
    f = det.features(inn)
    torch.testing.assert_close(f.flipped_bpd, det.features(inn.flip(2)).bpd)
    assert (det.score(f) < 0).float().mean() > 0.8 and det.score(f).mean() < -0.1  # upright reads better


def test_ratio_against_a_background_of_perturbed_inputs(model, reference):
    background = fitted(ood.perturb(skewed(2000, 0), 1.0, K, torch.Generator().manual_seed(0)), seed=1)
    det = ood.Detector(model, reference, "ratio", background=background)
    inn, noise = skewed(300, 2), torch.randint(0, K, (300, *SHAPE), generator=torch.Generator().manual_seed(3))
    f = det.features(inn)
    torch.testing.assert_close(det.score(f), f.bpd - f.background_bpd)
    assert auroc(det.score(f), det.score(noise)) > 0.9
    same = ood.Detector(model, reference, "ratio", background=model)  # a model against itself: no evidence
    assert det.score(inn).abs().max() > 0.01 and same.score(inn).abs().max() < 1e-5


def test_complexity_is_bpd_less_codec_length(model, reference):
    det = ood.Detector(model, reference, "complexity", codec="png")
    f = det.features(skewed(10, 8))
    torch.testing.assert_close(det.score(f), f.bpd - ood.codec_bits_per_dim(skewed(10, 8), K, "png"))
    x = torch.zeros(2, 3, 16, 16, dtype=torch.long)
    x[1] = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    for codec in ood.CODECS:  # RGB too; noise is longer than a constant image
        bits = ood.codec_bits_per_dim(x, 256, codec)
        assert bits[1] > 4 * bits[0]


def test_perturb_replaces_a_fraction_mu():
    x = torch.zeros(100, 1, 10, 10, dtype=torch.long)
    changed = (ood.perturb(x, 0.3, 256, torch.Generator().manual_seed(0)) != x).double().mean()
    assert 0.27 < changed < 0.33 and (ood.perturb(x, 0.0, 256) == x).all()
    ds = ood.PerturbedDataset(x, 256, mu=0.5)
    assert not torch.equal(ds.batch(torch.arange(10)), ds.batch(torch.arange(10)))  # fresh each call


def test_every_score_works_on_rgb():
    shape = (3, 3, 3)
    rgb = fitted(skewed(500, 0, shape), shape, steps=30)
    det_ref = skewed(50, 1, shape)
    for score in ood.SCORES:
        det = ood.Detector(rgb, det_ref, score, background=rgb)
        p = det.p_values(skewed(5, 2, shape))
        assert p.shape == (5,) and ((p > 0) & (p <= 1)).all()


def test_one_line_errors(model, reference):
    det = ood.Detector(model, reference, "combined")
    with pytest.raises(ValueError, match="shape"):
        det.score(torch.zeros(2, 1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        det.score(torch.full((2, *SHAPE), 4))
    with pytest.raises(ValueError, match="unknown score"):
        ood.Detector(model, reference, "entropy")
    with pytest.raises(ValueError, match="background"):
        ood.Detector(model, reference, "ratio")
    with pytest.raises(ValueError, match="background"):
        ood.Detector(model, reference, "combined", combine=("ratio", "complexity"))
    with pytest.raises(ValueError, match="combine"):
        ood.Detector(model, reference, "combined", combine=("bpd", "entropy"))
    other = pc.create("gated_pixelcnn", (1, 5, 5), K, channels=4, num_layers=1, kernel_size=3, head_channels=4)
    with pytest.raises(ValueError, match="must match"):
        ood.Detector(model, reference, "ratio", background=other)
    with pytest.raises(ValueError, match="lack"):
        ood.Detector(model, reference, "complexity").score(ood.Features(ood.nll_map(model, reference)))
    with pytest.raises(ValueError, match="NaN"):
        ood.p_values(torch.tensor([float("nan")]), torch.zeros(3))


def test_cli_detect_scores(model, reference, tmp_path, capsys):
    import numpy as np

    from pixelchain.cli import main

    pc.save(model, tmp_path / "model")
    pc.save(fitted(ood.perturb(skewed(500, 0), 0.5, K), steps=20), tmp_path / "background")
    np.save(tmp_path / "ref.npy", reference.numpy().astype(np.uint8))
    x = torch.cat([skewed(5, 9), torch.randint(0, K, (5, *SHAPE), generator=torch.Generator().manual_seed(1))])
    np.save(tmp_path / "x.npy", x.numpy().astype(np.uint8))
    common = [str(tmp_path / "model"), str(tmp_path / "x.npy"), "--reference", str(tmp_path / "ref.npy"), "--device",
              "cpu"]
    main(["detect", *common, "--score", "ratio", "--background", str(tmp_path / "background"),
          "--out", str(tmp_path / "d")])
    lines = (tmp_path / "d" / "p_values.csv").read_text().splitlines()
    assert lines[0] == "index,bits_per_dim,score,p_value" and len(lines) == 11
    p = torch.tensor([float(line.split(",")[3]) for line in lines[1:]])
    assert p[5:].max() < p[:5].min()  # the noise images are the atypical ones
    assert "batch typicality test p =" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["detect", *common, "--score", "ratio", "--out", str(tmp_path / "e")])
    assert exit_.value.code == 1 and "background" in capsys.readouterr().err.strip()
    np.save(tmp_path / "bad.npy", np.zeros((2, 1, 5, 5), np.uint8))
    with pytest.raises(SystemExit):
        main(["detect", common[0], str(tmp_path / "bad.npy"), *common[2:]])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shape" in err
