"""The checkpoints shipped with the package load (JSON + safetensors only) and are the weights
that were measured: their NLL on the first test images is the one recorded when they shipped."""

import json

import pytest

import pixelchain as pc
from pixelchain.checkpoint import PRETRAINED_DIR

SHIPPED = pc.pretrained()


def test_checkpoints_are_shipped():
    families = ["fvsbn", "nade", "made", "pixelcnn_cpu", "gated_pixelcnn_cpu", "pixelcnn_pp_cpu", "row_lstm_cpu",
                "diagonal_bilstm_cpu", "transformer_cpu"]
    assert {f"bmnist_{f}" for f in families} | {"fvsbn_caltech", "logistic_regression_mnist"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_scores_as_recorded(name):
    result = json.loads((PRETRAINED_DIR / name / "result.json").read_text())
    model = pc.load(name)
    dataset = json.loads((PRETRAINED_DIR / name / "config.json").read_text())["dataset"]["name"]
    check = result["check"]
    first = pc.data.load(dataset, "test").subset(slice(0, check["test_images"]))
    metrics = pc.evaluate(model, first)
    assert metrics["nll"] == pytest.approx(check["nll"], abs=1e-3)
    if model.kind == "density":
        assert metrics["bits_per_dim"] < 0.5  # trained: a uniform binary model scores 1 bit/dim
        x = model.sample(2)
        assert x.shape == (2, *model.image_shape)


def test_cli_samples_a_shipped_checkpoint_into_the_current_directory(tmp_path, monkeypatch, capsys):
    from pixelchain.cli import main

    monkeypatch.chdir(tmp_path)
    main(["sample", "bmnist_fvsbn", "-n", "4"])
    assert (tmp_path / "bmnist_fvsbn_samples.png").is_file()
    assert not (PRETRAINED_DIR / "bmnist_fvsbn" / "samples.png").exists()
    main(["list"])
    assert "bmnist_fvsbn" in capsys.readouterr().out
