"""What a researcher naturally tries in the first hour works: dead weights, scoring
one's own images, completion masks, eval mode on load, arrays out of the CLI, sampling controls,
discoverability, Python ergonomics and logs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pixelchain as pc
from pixelchain import score
from pixelchain.run_dir import RunDir, load_tensors, save_tensors


def tiny_gated(num_layers=2):
    torch.manual_seed(0)
    return pc.create("gated_pixelcnn", (1, 6, 5), 2, channels=4, num_layers=num_layers, head_channels=4)


def test_gated_weights_of_earlier_versions_load_without_their_dead_residual(tmp_path):
    """Files written before the last layer lost its unused residual projection still load (those
    two tensors, and only those, are dropped); any other unexpected tensor is refused."""
    model = tiny_gated()
    pc.save(model, tmp_path)
    path = RunDir(tmp_path) / "model.safetensors"
    state, _ = load_tensors(path)
    save_tensors(path, {**state, "layers.2.residual.weight": torch.zeros(4, 4, 1, 1),
                        "layers.2.residual.bias": torch.zeros(4)})
    x = torch.randint(0, 2, (3, 1, 6, 5))
    assert torch.equal(pc.load(tmp_path).log_prob(x), model.eval().log_prob(x))
    save_tensors(path, {**state, "layers.1.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not match"):
        pc.load(tmp_path)


@pytest.mark.parametrize("model,hparams", [("gated_pixelcnn", ["channels=8", "num_layers=2"]),
                                           ("nade", ["hidden=16"])])
def test_torchrun_trains_a_conv_and_a_dense_family_an_epoch(tmp_path, model, hparams):
    """Data-parallel training on two gloo processes, an epoch of the digits: no unused-parameter
    error, and no warning (the gradients are the DDP buckets' views)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "pixelchain.cli", "train",
           model, "--dataset", "digits", "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "64",
           "--no-figures", "--quiet"] + [a for h in hparams for a in ("--set", h)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test NLL" in done.stdout
    assert "Warning" not in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_load_returns_a_model_in_eval_mode_and_fit_leaves_it_there(tmp_path):
    """With dropout, two scores of the same images agree after pc.load; fit trains in train mode."""
    torch.manual_seed(0)
    model = pc.create("pixelcnn", (1, 6, 5), 2, channels=4, num_blocks=2, head_channels=4, dropout=0.5)
    pc.save(model, tmp_path)
    loaded = pc.load(tmp_path)
    assert not loaded.training
    x = torch.randint(0, 2, (4, 1, 6, 5))
    assert torch.equal(loaded.log_prob(x), loaded.log_prob(x))
    modes = []
    loaded.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    pc.fit(loaded, pc.data.ImageDataset(x, 2), epochs=1, batch_size=4, progress=False)
    assert modes[0] and not loaded.training


def test_load_on_a_device_this_machine_lacks_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        pc.load("bmnist_nade", map_location="cuda")


def test_scoring_builds_no_graph():
    model = pc.load("bmnist_nade")
    x = pc.data.ImageDataset(torch.randint(0, 2, (3, 1, 28, 28)), 2)
    assert not score.log_prob(model, x.images).requires_grad
    assert not score.log_prob_map(model, x.images).requires_grad


# ----------------------------------------------------------------------------- eval MODEL IMAGES
def run_cli(*argv, capsys=None):
    from pixelchain.cli import main

    main([*argv, "--quiet"])
    return capsys.readouterr() if capsys is not None else None


def test_eval_scores_ones_own_images_per_image(tmp_path, capsys):
    """A .npy of 0..255 images against a binary model: refused with the flag to pass, then scored
    per image with the same threshold binarisation train applies; the CSV's scores are the model's."""
    from pixelchain.cli import main

    rng = np.random.default_rng(0)
    images = (rng.random((5, 28, 28)) < 0.2).astype(np.uint8) * 255
    np.save(tmp_path / "x.npy", images)
    with pytest.raises(SystemExit):
        main(["eval", "bmnist_nade", str(tmp_path / "x.npy"), "--quiet"])
    assert "--binarize" in capsys.readouterr().err
    out = run_cli("eval", "bmnist_nade", str(tmp_path / "x.npy"), "--binarize", "threshold", "--out",
                  str(tmp_path / "s.csv"), "--heatmap", str(tmp_path / "h.png"), capsys=capsys).out
    rows = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    model = pc.load("bmnist_nade")
    expected = -model.log_prob(torch.from_numpy(images[:, None] >= 128).long()).double().detach()
    assert rows.shape == (5, 3) and np.allclose(rows[:, 1], expected.numpy(), atol=1e-4)
    assert np.allclose(rows[:, 2], rows[:, 1] / (784 * np.log(2)), atol=1e-5)
    assert f"mean NLL {expected.mean():.3f} nats" in out
    assert (tmp_path / "h.png").is_file()


def test_eval_scores_a_slice_of_a_split_and_a_png_folder_alike(tmp_path, capsys):
    from PIL import Image

    test = pc.data.load("digits", "test")
    for i in range(4):  # digits have 17 levels: as 8-bit intensities that quantise back to them
        intensities = (test.images[i, 0] * 256 + 16) // 17  # ceil(v * 256 / 17): floor(x * 17 / 256) = v
        Image.fromarray(intensities.numpy().astype(np.uint8)).save(tmp_path / f"{i}.png")
    model = pc.create("fully_visible", (1, 8, 8), 17)
    pc.save(model, tmp_path / "run", dataset={"name": "digits"})
    a = run_cli("eval", str(tmp_path / "run"), "digits:test[:4]", capsys=capsys).out.splitlines()[-1]
    b = run_cli("eval", str(tmp_path / "run"), str(tmp_path), capsys=capsys).out.splitlines()[-1]
    assert a.split(": ", 1)[1] == b.split(": ", 1)[1]


def binary_images(tmp_path, n: int) -> str:
    """n random binary 28x28 images as a .npy (no dataset needed)."""
    path = tmp_path / "binary.npy"
    np.save(path, np.random.default_rng(0).integers(0, 2, (n, 1, 28, 28)).astype(np.uint8))
    return str(path)


def test_eval_with_labels_for_a_model_that_has_no_classes_is_refused(tmp_path, capsys):
    from pixelchain.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "bmnist_nade", binary_images(tmp_path, 2), "--num-levels", "2", "--label", "3", "--quiet"])
    assert "not class-conditional" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sampling and completion
def test_samples_depend_on_the_seed_and_index_not_the_batching():
    model = tiny_gated().eval()
    a = model.sample(7, generator=torch.Generator().manual_seed(3), batch_size=2)
    b = model.sample(7, generator=torch.Generator().manual_seed(3), batch_size=7)
    c = model.sample(3, generator=torch.Generator().manual_seed(3), batch_size=1, naive=True)
    assert torch.equal(a, b) and torch.equal(a[:3], c)
    assert not torch.equal(a, model.sample(7, generator=torch.Generator().manual_seed(4)))


def test_temperature_zero_takes_the_most_likely_value_at_each_step():
    model = tiny_gated().eval()
    x = model.sample(2, temperature=0)
    assert torch.equal(x[0], x[1])  # no randomness left
    # with 2 levels the most likely value has probability >= 1/2 given the values before it
    assert torch.all(model.log_prob_map(x) >= np.log(0.5) - 1e-6)


def test_complete_takes_masks_that_broadcast():
    model = tiny_gated().eval()
    x = torch.randint(0, 2, (3, 1, 6, 5))
    observed = torch.ones(6, 5, dtype=torch.bool)
    observed[3:] = False
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.complete(x, observed, g())
    b = model.complete(x, observed[None, None], g())
    c = model.complete(x, observed.expand(3, 1, 6, 5).clone(), g())
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a[:, :, :3], x[:, :, :3])
    with pytest.raises(ValueError, match="broadcast"):
        model.complete(x, torch.ones(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("spec,missing_rows,missing_cols", [("top", slice(0, 3), slice(None)),
                                                            ("bottom", slice(3, 6), slice(None)),
                                                            ("left", slice(None), slice(0, 2)),
                                                            ("right", slice(None), slice(2, 5))])
def test_named_masks(spec, missing_rows, missing_cols):
    from pixelchain.masks import missing

    m = missing(spec, (2, 1, 6, 5))
    expected = torch.zeros(2, 1, 6, 5, dtype=torch.bool)
    expected[:, :, missing_rows, missing_cols] = True
    assert torch.equal(m, expected)
    assert missing("centre", (1, 1, 6, 6))[0, 0].sum() == 9
    share = missing("random:0.3", (50, 1, 6, 5), torch.Generator().manual_seed(0)).double().mean()
    assert 0.25 < share < 0.35


def test_cli_completes_ones_own_images_with_a_mask_file_into_arrays(tmp_path, capsys):
    x = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).numpy().astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    mask = np.zeros((28, 28), bool)
    mask[:, 14:] = True  # right half missing
    np.save(tmp_path / "mask.npy", mask)
    run_cli("complete", "bmnist_nade", str(tmp_path / "x.npy"), "--mask", str(tmp_path / "mask.npy"),
            "--per-image", "2", "--out", str(tmp_path / "c.npz"), capsys=capsys)
    out = np.load(tmp_path / "c.npz")
    assert out["images"].shape == (6, 1, 28, 28) and out["observed"].shape == (6, 1, 28, 28)
    assert np.array_equal(out["images"][::2, :, :, :14], x[:, :, :, :14])
    assert np.array_equal(out["observed"][0, 0], ~mask)


def test_cli_sample_writes_arrays_and_never_overwrites_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_cli("sample", "bmnist_nade", "-n", "5", "--batch-size", "2", "--out", "a.npy")
    run_cli("sample", "bmnist_nade", "-n", "5", "--out", "b.npz")
    a, b = np.load("a.npy"), np.load("b.npz")["images"]
    assert a.shape == (5, 1, 28, 28) and a.dtype == np.uint8 and np.array_equal(a, b)
    run_cli("sample", "bmnist_nade", "-n", "2")
    run_cli("sample", "bmnist_nade", "-n", "2")
    assert (tmp_path / "bmnist_nade_samples.png").is_file() and (tmp_path / "bmnist_nade_samples-1.png").is_file()


# ----------------------------------------------------------------------------- discoverability, Python
def test_list_shows_shipped_scores_and_a_models_hyperparameters(capsys):
    details = {c["name"]: c for c in pc.pretrained(details=True)}
    assert set(details) == set(pc.pretrained())
    nade = details["bmnist_nade"]
    assert nade["dataset"] == "binarized_mnist" and nade["num_levels"] == 2 and nade["parameters"] > 0
    assert nade["test_bits_per_dim"] == pytest.approx(nade["test_nll"] / (784 * np.log(2)))
    out = run_cli("list", capsys=capsys).out
    assert "bmnist_nade" in out and f"{nade['test_nll']:.2f} nats" in out
    out = run_cli("list", "gated_pixelcnn", capsys=capsys).out
    assert "channels = 64" in out and "num_classes = None" in out
    assert "num_layers = 10" in pc.create.__doc__


def test_fit_takes_a_tensor_or_a_torch_dataset_and_datasets_slice():
    x = torch.randint(0, 2, (8, 1, 6, 5))
    model = tiny_gated()
    pc.fit(model, x, x[:4], epochs=1, batch_size=4, progress=False)
    pc.fit(model, torch.utils.data.TensorDataset(x, torch.zeros(8)), epochs=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="ImageDataset"):
        pc.fit(model, x.float(), epochs=1)
    ds = pc.data.ImageDataset(x, 2, torch.arange(8))
    assert torch.equal(ds[2], x[2])
    part = ds[2:5]
    assert len(part) == 3 and torch.equal(part.labels, torch.arange(2, 5)) and torch.equal(ds[[0, 7]].images, x[[0, 7]])


def test_heatmap_draws_each_image_beside_its_surprise(tmp_path):
    from PIL import Image

    from pixelchain import plots

    model = tiny_gated().eval()
    x = torch.randint(0, 2, (3, 1, 6, 5))
    plots.heatmap(x, score.log_prob_map(model, x), 2, tmp_path / "h.png", ncols=1, scale=1)  # a row each
    assert Image.open(tmp_path / "h.png").size == (2 * (5 + 1) + 1, 3 * (6 + 1) + 1)


def test_quiet_turns_progress_bars_off(tmp_path, capsys):
    run_cli("eval", "bmnist_nade", binary_images(tmp_path, 300), "--num-levels", "2", capsys=None)
    assert "evaluating" not in capsys.readouterr().err


def test_class_conditional_sampling_and_scoring_from_the_cli(tmp_path, capsys):
    from pixelchain.cli import main

    torch.manual_seed(0)
    model = pc.create("gated_pixelcnn", (1, 8, 8), 17, channels=4, num_layers=1, head_channels=4, num_classes=10)
    pc.save(model, tmp_path / "run", dataset={"name": "digits"})
    run = str(tmp_path / "run")
    run_cli("sample", run, "-n", "3", "--label", "7", "--out", str(tmp_path / "s.npz"))
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == [7, 7, 7]
    with pytest.raises(SystemExit):
        main(["sample", run, "-n", "2", "--quiet"])
    assert "--label" in capsys.readouterr().err
    out = run_cli("eval", run, "digits:test[:4]", "--out", str(tmp_path / "e.csv"), capsys=capsys).out
    test = pc.data.load("digits", "test")
    expected = -model.eval().log_prob(test.images[:4], test.labels[:4]).double().mean()
    assert f"mean NLL {expected:.3f} nats" in out
