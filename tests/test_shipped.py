"""The checkpoints shipped with the package load (JSON + safetensors only) and are the weights
that were measured: their NLL on the first test images, shipped beside them (check.safetensors),
is the one recorded when they shipped, on any machine, with or without the dataset."""

import math

import pytest
import torch

import pixelchain as pc
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.run_dir import RunDir

SHIPPED = pc.pretrained()


def test_checkpoints_are_shipped():
    """One checkpoint per family and dataset, the best (and PixelDefend's ResNet for purified images)."""
    families = ["fvsbn_per_pixel", "nade", "made", "pixelcnn", "gated_pixelcnn", "pixelcnn_pp", "row_lstm",
                "diagonal_bilstm", "transformer"]
    assert set(SHIPPED) == {f"bmnist_{f}" for f in families} | {"fvsbn_caltech", "logistic_regression_mnist",
                                                                 "fmnist_resnet", "fmnist_resnet_pd", "fmnist_vgg",
                                                                 "fmnist_pixelcnn_pp",
                                                                 "fmnist_background", "mnist_pixelcnn_pp"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_scores_as_recorded(name):
    run = RunDir(PRETRAINED_DIR / name)
    result = run.read_result()
    model = pc.load(name)
    check = result["check"]
    images, labels = run.read_check()
    first = pc.data.ImageDataset(images, model.num_levels, labels)
    assert len(first) == check["test_images"]
    metrics = pc.evaluate(model, first)
    assert metrics["nll"] == pytest.approx(check["nll"], abs=1e-3)
    if model.kind == "density":
        # trained: half a uniform model's log2(K) bits/dim at most
        assert metrics["bits_per_dim"] < 0.5 * math.log2(model.num_levels)
        x = model.sample(2)
        assert x.shape == (2, *model.image_shape)


def test_cli_samples_a_shipped_checkpoint_into_the_current_directory(tmp_path, monkeypatch, capsys):
    from pixelchain.cli import main

    monkeypatch.chdir(tmp_path)
    main(["sample", "bmnist_fvsbn_per_pixel", "-n", "4"])
    assert (tmp_path / "bmnist_fvsbn_per_pixel_samples.png").is_file()
    assert not (PRETRAINED_DIR / "bmnist_fvsbn_per_pixel" / "samples.png").exists()
    main(["list"])
    assert "bmnist_fvsbn_per_pixel" in capsys.readouterr().out


@pytest.mark.parametrize("name", SHIPPED)
def test_check_images_are_the_first_test_images(name):
    """Where the dataset is at hand, the shipped check images are its first test images."""
    config = RunDir(PRETRAINED_DIR / name).read_config()
    try:
        test = pc.data.load(config["dataset"]["name"], "test")
    except pc.data.DataError as error:
        pytest.skip(f"dataset not at hand: {error}")
    images, labels = RunDir(PRETRAINED_DIR / name).read_check()
    assert torch.equal(images, test.images[: len(images)])
    assert labels is None or torch.equal(labels, test.labels[: len(images)])
