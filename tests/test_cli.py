"""The command line, end to end on the embedded digits."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import train_under_torchrun
from PIL import Image

import pixelchain as pc
from pixelchain.cli import main

SMALL_GATED = ["--set", "channels=8", "--set", "num_layers=2", "--set", "head_channels=8"]


def test_train_eval_sample_complete(tmp_path, capsys):
    run = tmp_path / "gated"
    main(["train", "gated_pixelcnn", "--dataset", "digits", "--run-dir", str(run), "--epochs", "1", *SMALL_GATED])
    out = capsys.readouterr().out
    assert "test NLL:" in out and "bits/dim" in out
    for name in ("config.json", "model.safetensors", "trainer_state.safetensors", "metrics.jsonl",
                 "samples.png", "completions.png", "result.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["dataset"]["name"] == "digits"
    # 8 test images, each: original | occluded | 4 completions, on a 3x scaled 8x8 grid.
    assert Image.open(run / "completions.png").size == (3 * (6 * 9 + 1), 3 * (8 * 9 + 1))

    main(["eval", str(run), "--split", "valid"])
    assert "valid NLL:" in capsys.readouterr().out
    main(["sample", str(run), "-n", "6", "--out", str(tmp_path / "s.png")])
    assert "6 samples" in capsys.readouterr().out and (tmp_path / "s.png").is_file()
    main(["sample", str(run), "-n", "2", "--naive", "--out", str(tmp_path / "naive.png")])
    main(["complete", str(run), "-n", "2", "--per-image", "3", "--out", str(tmp_path / "c.png")])
    assert Image.open(tmp_path / "c.png").size == (3 * (5 * 9 + 1), 3 * (2 * 9 + 1))


def test_logistic_regression_reports_accuracy(tmp_path, capsys):
    main(["train", "logistic_regression", "--dataset", "digits", "--run-dir", str(tmp_path / "lr"),
          "--epochs", "5", "--lr", "0.01"])
    out = capsys.readouterr().out
    assert "accuracy" in out and "test NLL" in out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "fvsbn", "--dataset", "digits", "--run-dir", str(tmp_path / "x")])
    assert exit_.value.code == 1
    assert "17 levels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "fvsbn", "--dataset", "digits", "--set", "nonsense=3", "--run-dir", str(tmp_path / "y")])
    assert "no hyperparameter nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "nothing")])
    assert "no config.json" in capsys.readouterr().err


def start_training(run, epochs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pixelchain.cli", "train", "fully_visible", "--dataset", "digits",
           "--run-dir", str(run), "--epochs", str(epochs), "--checkpoint-seconds", "0", "--no-figures"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(run, process, steps=30):
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            return
        time.sleep(0.05)
    pytest.fail("training did not checkpoint in time")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "kill"])
def test_interrupted_run_resumes_to_the_end(tmp_path, how):
    """Ctrl-C and SIGTERM (what schedulers send) checkpoint and stop; a killed run resumes from its
    last checkpoint."""
    run, epochs = tmp_path / "run", 60  # 20 steps per epoch
    process = start_training(run, epochs)
    wait_for_checkpoint(run, process)
    signum = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "kill": signal.SIGKILL}[how]
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]
    if how != "kill":
        assert process.returncode == 128 + signum, output
        assert "checkpoint saved" in output and "resume" in output
    else:
        assert process.returncode == -signal.SIGKILL
    done_before = len((run / "metrics.jsonl").read_text().splitlines())
    assert done_before < epochs, "the run finished before it could be interrupted"

    resumed = subprocess.run(
        [sys.executable, "-m", "pixelchain.cli", "train", "fully_visible", "--dataset", "digits", "--run-dir",
         str(run), "--epochs", str(epochs), "--resume", "--no-figures"],
        capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"trained {epochs * 20} steps" in resumed.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))


def test_data_parallel_training_under_torchrun(tmp_path):
    """Two gloo processes train one model: each sees half of every epoch, rank 0 writes the run."""
    run = tmp_path / "ddp"
    done = train_under_torchrun(run, batch_size=32, epochs=2)
    assert done.stdout.count("test NLL") == 1  # only rank 0 reports
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40]  # 1256 images -> 628 per process -> 20 batches of <= 32
    assert json.loads((run / "config.json").read_text())["train"]["processes"] == 2


def test_train_flags_are_the_training_options():
    """pixelchain train's flags are built from TrainOptions: one per field, defaults from the dataclass
    (or, when resuming, from the run's record)."""
    import dataclasses

    from pixelchain.cli import build_parser, train_options
    from pixelchain.train import TrainOptions

    parse = build_parser().parse_args
    args = parse(["train", "fvsbn", "--epochs", "3", "--lr-decay", "0.5", "--amp", "--max-time", "9"])
    assert train_options(args, {}) == TrainOptions(epochs=3, lr_decay=0.5, amp=True, max_time=9.0)
    assert train_options(parse(["train", "fvsbn"]), {"lr": 0.1, "epochs": 7}) == TrainOptions(lr=0.1, epochs=7)
    assert train_options(parse(["train", "fvsbn", "--no-amp"]), {"amp": True}) == TrainOptions(amp=False)
    every = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainOptions)]
    switches = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainOptions) if f.type == "bool"}
    given = parse(["train", "fvsbn", *[x for flag in every for x in ([flag] if flag in switches else [flag, "1"])]])
    assert all(hasattr(given, f.name) for f in dataclasses.fields(TrainOptions))


def test_train_never_replaces_a_saved_model_unless_asked(tmp_path, capsys):
    saved = pc.save(pc.create("fully_visible", (1, 8, 8), 17), tmp_path / "saved")
    before = (saved / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "fully_visible", "--dataset", "digits", "--run-dir", str(saved), "--max-steps", "1"])
    assert exit_.value.code == 1 and "already holds a model" in capsys.readouterr().err
    assert (saved / "model.safetensors").read_bytes() == before and not (saved / "trainer_state.safetensors").exists()
    main(["train", "fully_visible", "--dataset", "digits", "--run-dir", str(saved), "--epochs", "1", "--overwrite",
          "--no-figures"])
    assert (saved / "model.safetensors").read_bytes() != before


@pytest.mark.parametrize("change,named", [(["--dataset", "mnist"], "dataset 'mnist'"),
                                          (["--num-levels", "4"], "num_levels 4"),
                                          (["--binarize", "threshold"], "binarize 'threshold'")])
def test_resume_refuses_other_data_naming_the_difference(tmp_path, capsys, change, named):
    run = tmp_path / "run"
    main(["train", "fully_visible", "--dataset", "digits", "--run-dir", str(run), "--max-steps", "1", "--no-figures"])
    state = (run / "trainer_state.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "fully_visible", "--run-dir", str(run), "--resume", *change])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and named in err and "the run's" in err, err
    assert (run / "trainer_state.safetensors").read_bytes() == state
    with pytest.raises(SystemExit):
        main(["train", "fvsbn", "--run-dir", str(run), "--resume"])
    assert "model 'fvsbn'" in capsys.readouterr().err
