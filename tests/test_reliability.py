"""What a new user tried and got garbage, a corrupted run or a traceback: each of
these failed before and is a clear result or a clear error now."""

import errno
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_under_torchrun
from safetensors.torch import save_file
from test_properties import DENSITY_MODELS, TINY, build

import pixelchain as pc
import pixelchain.models.base as base
import pixelchain.run_dir as run_dir_module
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.cli import main
from pixelchain.decode import MostLikelyInWindow, decode
from pixelchain.heads import sample_inverse_cdf
from pixelchain.run_dir import METRICS, STATE, WEIGHTS, RunDir, RunDirLocked

OLD_RUN = Path(__file__).parent / "data" / "run_v0_1"  # written by pixelchain 0.1.0 before this issue


@pytest.fixture(scope="module")
def digits():
    return pc.data.load("digits", "train").subset(slice(0, 200)), pc.data.load("digits", "valid").subset(slice(0, 60))


def fully_visible(digits):
    torch.manual_seed(0)
    return pc.create("fully_visible", digits[0].image_shape, digits[0].num_levels)


def records(run):
    return [json.loads(line) for line in (Path(run) / METRICS).read_text().splitlines()]


def cli_error(argv, capsys, code=1):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == code
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- 1. temperatures, NaN
@pytest.mark.parametrize("name", DENSITY_MODELS)
def test_tiny_temperatures_give_the_greedy_decode_and_never_an_out_of_range_value(name):
    K = TINY[name][1][-1]
    model = build(name, (1, 3, 3), K)
    greedy = decode(model, torch.zeros(3, 1, 3, 3, dtype=torch.long), MostLikelyInWindow(torch.zeros(3, 1, 3, 3,
                                                                                         dtype=torch.long), K))
    for temperature in (0, 1e-300, 1e-45, 1e-12):  # 0: the greedy decode itself
        x = model.sample(3, generator=torch.Generator().manual_seed(0), temperature=temperature)
        assert 0 <= int(x.min()) and int(x.max()) < K
        assert torch.equal(x, greedy), temperature
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            model.sample(2, temperature=bad)


@pytest.mark.parametrize("name", DENSITY_MODELS)
def test_nan_weights_raise_instead_of_returning_num_levels(name):
    model = build(name, (1, 2, 2), TINY[name][1][0])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        model.sample(2)


def test_inverse_cdf_never_returns_num_levels():
    log_probs = torch.tensor([[0.5, 0.5, 0.0]]).log()
    values = sample_inverse_cdf(log_probs.expand(4, 3), torch.tensor([0.0, 0.49, 0.51, 1.0]))
    assert values.tolist() == [0, 0, 1, 1]  # value 2 has probability 0; u = 1 is kept below the top
    for bad in (torch.full((1, 3), float("nan")), torch.full((1, 3), -math.inf)):
        with pytest.raises(ValueError, match="NaN or has no probability mass"):
            sample_inverse_cdf(bad, torch.tensor([0.5]))


def test_cli_rejects_a_nan_temperature(tmp_path, capsys):
    assert "temperature" in cli_error(["sample", "bmnist_nade", "--temperature", "nan", "-n", "2", "--out",
                                       str(tmp_path / "s.png")], capsys)
    assert not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------- 2. run-directory lock
def test_a_second_training_on_a_locked_run_directory_fails_at_once(digits, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pixelchain.run_dir import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('locked', flush=True)\n    time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"in use by another process \\(pid {holder.pid}\\)"):
            pc.fit(fully_visible(digits), *digits, run_dir=run, max_steps=1, progress=False)
        assert not (run / "config.json").exists()  # nothing of the refused run was written
        err = cli_error(["train", "fully_visible", "--dataset", "digits", "--run-dir", str(run)], capsys)
        assert "in use by another process" in err
    finally:
        holder.kill()
        holder.wait()
    pc.fit(fully_visible(digits), *digits, run_dir=run, max_steps=1, progress=False)  # the lock died with it
    pc.fit(fully_visible(digits), *digits, run_dir=run, max_steps=2, resume=True, progress=False)


# ----------------------------------------------------------------------------- 3. batched decoding
def test_sample_and_complete_decode_in_batches(monkeypatch):
    model = build("gated_pixelcnn", (1, 3, 3), 2)
    sizes, real = [], base.decode
    monkeypatch.setattr(base, "decode", lambda model, x, *a, **k: sizes.append(len(x)) or real(model, x, *a, **k))
    assert model.sample(10, batch_size=4).shape == (10, 1, 3, 3) and sizes == [4, 4, 2]
    sizes.clear()
    model.sample(base.DECODE_BATCH + 3)
    assert sizes == [base.DECODE_BATCH, 3]  # bounded by default
    sizes.clear()
    x = torch.randint(0, 2, (7, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    observed = torch.rand(7, 1, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.5
    done = model.complete(x, observed, batch_size=3)
    assert sizes == [3, 3, 1] and torch.equal(done[observed], x[observed])
    with pytest.raises(ValueError, match="batch_size"):
        model.sample(2, batch_size=0)


def test_cli_decoding_sizes_must_be_positive(capsys):
    assert "-n" in cli_error(["complete", "bmnist_nade", "-n", "0"], capsys, code=2)
    assert "--batch-size" in cli_error(["sample", "bmnist_nade", "--batch-size", "-1"], capsys, code=2)


# ----------------------------------------------------------------------------- 4. options honoured or rejected
@pytest.mark.parametrize("option,value", [
    ("grad_clip", -1.0), ("lr_decay", -0.5), ("lr_decay", 0.0), ("lr", float("nan")), ("max_steps", 0),
    ("max_steps", -3), ("max_time", -1.0), ("eval_every", -5), ("eval_every", 0), ("batch_size", 0),
    ("epochs", 2.5), ("patience", 0), ("weight_decay", -1e-3),
])
def test_options_out_of_range_are_rejected_before_anything_is_written(digits, tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "run", progress=False, **{option: value})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", DENSITY_MODELS)
def test_model_sizes_must_be_positive_integers(name):
    hparams, levels = TINY[name]
    sizes = [k for k, v in hparams.items() if k != "seed" and not isinstance(v, bool) and isinstance(v, (int, tuple))]
    for key in sizes:
        for bad in (0, -1, 2.5, "abc"):
            with pytest.raises(ValueError, match=key):
                pc.create(name, (1, 4, 4), levels[0], **{**hparams, key: bad})


def test_resume_honours_a_new_learning_rate_and_rejects_a_new_batch_size_mid_epoch(digits, tmp_path):
    kwargs = dict(batch_size=16, lr_decay=0.5, progress=False)  # 13 batches per epoch
    pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "a", epochs=1, lr=1e-3, **kwargs)
    pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "a", epochs=2, lr=4e-3, resume=True, **kwargs)
    assert [r["lr"] for r in records(tmp_path / "a")] == pytest.approx([1e-3 * 0.5, 4e-3 * 0.25])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["lr"] == 4e-3

    pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "b", epochs=2, max_steps=5, **kwargs)
    with pytest.raises(ValueError, match="batch_size 16, not 32.*inside epoch 1"):
        pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "b", epochs=2, resume=True,
               **{**kwargs, "batch_size": 32})
    with pytest.raises(ValueError, match="weight_decay"):
        pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "b", epochs=2, resume=True, weight_decay=0.1,
               **kwargs)
    summary = pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "b", epochs=2, resume=True, **kwargs)
    assert summary["step"] == 26
    # at an epoch's end the batch size may change: epoch 3 takes ceil(200 / 50) = 4 steps
    summary = pc.fit(fully_visible(digits), *digits, run_dir=tmp_path / "b", epochs=3, resume=True,
                     **{**kwargs, "batch_size": 50})
    assert summary["step"] == 30


def test_cli_resume_keeps_the_recorded_options_and_refuses_a_new_model(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["train", "fully_visible", "--dataset", "digits", "--run-dir", run, "--no-figures"]
    main([*common, "--epochs", "2", "--batch-size", "50", "--lr", "0.01", "--max-steps", "3"])
    main([*common, "--resume"])  # no --batch-size: the run's 50, not the default; no --max-steps: to the end
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (config["batch_size"], config["lr"], config["epochs"]) == (50, 0.01, 2)
    assert [r["step"] for r in records(run)] == [26, 52]  # ceil(1257 / 50) = 26 steps per epoch
    capsys.readouterr()
    assert "keeps its model" in cli_error([*common, "--resume", "--set", "nonsense=1"], capsys)


# ----------------------------------------------------------------------------- 5. clear errors
def test_empty_batches_and_splits_are_clear_errors(digits, tmp_path):
    model = fully_visible(digits)
    with pytest.raises(ValueError, match="empty batch"):
        model.log_prob(digits[1].images[:0])
    with pytest.raises(ValueError, match="empty"):
        pc.fit(model, digits[0], digits[1].subset(slice(0, 0)), run_dir=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="no images"):
        pc.evaluate(model, digits[1].subset(slice(0, 0)))


@pytest.mark.parametrize("argv,message", [
    (["--set", "channels=2.5"], "channels must be a positive integer"),
    (["--set", "channels=0"], "channels must be a positive integer"),
    (["--set", "num_layers=-1"], "num_layers must be a positive integer"),
    (["--device", "banana"], "unknown device"),
    (["--set", "head_channels=abc"], "head_channels must be a positive integer"),
])
def test_cli_train_reports_bad_values_before_making_the_run_directory(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    err = cli_error(["train", "gated_pixelcnn", "--dataset", "digits", "--run-dir", str(run), *argv], capsys)
    assert message in err and "Traceback" not in err
    assert not run.exists()


def test_cli_reports_missing_devices_classifiers_and_output_folders(tmp_path, capsys, monkeypatch):
    if not torch.cuda.is_available():
        assert "no CUDA device" in cli_error(["eval", "bmnist_nade", "--device", "cuda"], capsys)
    assert "only density models" in cli_error(["sample", "logistic_regression_mnist"], capsys)
    assert "only density models" in cli_error(["complete", "logistic_regression_mnist"], capsys)
    monkeypatch.setattr(base, "decode", lambda *a, **k: pytest.fail("decoded before checking --out"))
    for command in ("sample", "complete"):
        err = cli_error([command, "bmnist_nade", "--out", str(tmp_path / "missing" / "x.png")], capsys)
        assert "does not exist" in err


def test_damaged_run_files_are_named_in_the_error(digits, tmp_path):
    run = tmp_path / "run"
    kwargs = dict(epochs=2, batch_size=16, progress=False)
    pc.fit(fully_visible(digits), *digits, run_dir=run, max_steps=14, **kwargs)
    with open(run / METRICS, "a") as f:
        f.write("garbage\n")
    with pytest.raises(ValueError, match=f"{METRICS}, line 2"):
        pc.fit(fully_visible(digits), *digits, run_dir=run, resume=True, **kwargs)
    (run / METRICS).write_text((run / METRICS).read_text().replace("garbage\n", ""))

    state = (run / STATE).read_bytes()
    other = tmp_path / "other"
    pc.fit(pc.create("fvsbn", (1, 8, 8), 2), pc.data.load("digits", "valid", binarize="threshold"),
           run_dir=other, max_steps=1, progress=False)
    shutil.copy(other / STATE, run / STATE)
    with pytest.raises(ValueError, match=f"{STATE} does not match"):
        pc.fit(fully_visible(digits), *digits, run_dir=run, resume=True, **kwargs)
    (run / STATE).write_bytes(state[: len(state) // 2])
    with pytest.raises(ValueError, match=f"{STATE} is truncated"):
        pc.fit(fully_visible(digits), *digits, run_dir=run, resume=True, **kwargs)
    (run / STATE).write_bytes(state)
    pc.fit(fully_visible(digits), *digits, run_dir=run, resume=True, **kwargs)  # repaired: it resumes


@pytest.mark.parametrize("config,message", [
    ({"model": "fvsbn"}, "'args' is missing"),
    ({"model": 3, "args": {}}, "'model' is missing or not a string"),
    ({"model": "fvsbn", "args": {"image_shape": "1x2x2", "num_levels": 2}}, "image_shape"),
    ({"model": "fvsbn", "args": {"image_shape": [1, 2, 2], "num_levels": "2"}}, "num_levels"),
    ({"model": "nade", "args": {"image_shape": [1, 2, 2], "num_levels": 2, "hidden": "abc"}}, "hidden must be"),
    ([1, 2], "not a JSON object"),
])
def test_a_config_with_missing_keys_or_wrong_types_is_a_clear_error(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        pc.load(tmp_path)


def test_a_full_disk_while_checkpointing_keeps_the_previous_state(digits, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    pc.fit(fully_visible(digits), *digits, run_dir=run, epochs=1, batch_size=16, progress=False)
    before = (run / STATE).read_bytes()
    real = run_dir_module.save_file

    def full_disk(tensors, path, metadata=None):
        if Path(path).name.startswith(STATE):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(run_dir_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device.*the previous trainer_state.safetensors is intact"):
        pc.fit(fully_visible(digits), *digits, run_dir=run, epochs=2, batch_size=16, resume=True, progress=False)
    assert (run / STATE).read_bytes() == before and not list(run.glob("*.tmp"))
    err = cli_error(["train", "fully_visible", "--dataset", "digits", "--run-dir", str(run), "--resume",
                     "--epochs", "2", "--batch-size", "16", "--no-figures"], capsys)
    assert "is intact" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 6. names, digests
def test_a_shipped_name_is_a_name_never_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("bmnist_nade/../bmnist_fvsbn_per_pixel", "../../x", "bmnist_nade/", "./bmnist_nade"):
        with pytest.raises(FileNotFoundError, match="no shipped checkpoint of that name"):
            pc.load(name)
    assert pc.load("bmnist_nade").name == "nade"
    main(["sample", str(PRETRAINED_DIR / "bmnist_nade"), "-n", "2"])  # a path into the package: figures stay out
    assert (tmp_path / "bmnist_nade_samples.png").is_file()
    assert not (PRETRAINED_DIR / "bmnist_nade" / "samples.png").exists()


def test_a_flipped_byte_in_the_weights_is_detected(digits, tmp_path):
    model = fully_visible(digits)
    pc.save(model, tmp_path / "run")
    data = bytearray((tmp_path / "run" / WEIGHTS).read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    (tmp_path / "run" / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        pc.load(tmp_path / "run")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "run" / WEIGHTS))
    loaded = pc.load(tmp_path / "run")  # weights saved without a digest (before digests) still load
    torch.testing.assert_close(loaded.linear.weight, model.linear.weight)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    state["linear.weight"][0, 0] = float("nan")  # nothing vouches for these bytes: NaN is refused by name
    save_file(state, str(tmp_path / "run" / WEIGHTS))
    with pytest.raises(ValueError, match="no SHA-256.*NaN or infinite values in linear.weight"):
        pc.load(tmp_path / "run")


def test_shipped_weights_carry_a_digest_and_no_masks():
    for name in pc.pretrained():
        tensors, metadata = run_dir_module.load_tensors(PRETRAINED_DIR / name / WEIGHTS)
        assert "sha256" in metadata and not [k for k in tensors if k.endswith("mask")], name


# ----------------------------------------------------------------------------- 7. signals, DDP
def test_train_nll_is_the_mean_over_processes_under_torchrun(tmp_path):
    """One batch per process: the logged training NLL is the mean over both processes' images."""
    run = tmp_path / "ddp"
    train_under_torchrun(run, batch_size=1000, epochs=1)
    train = pc.data.load("digits", "train")
    torch.manual_seed(0)  # the CLI's initial weights (seed 0)
    model = pc.create("fully_visible", train.image_shape, train.num_levels)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: len(train) // 2 * 2]
    with torch.no_grad():
        nll = -model.log_prob(train.images[order])
    both, rank0 = nll.mean().item(), nll[0::2].mean().item()
    assert abs(both - rank0) > 1e-2  # the test can tell them apart
    assert records(run)[0]["train_nll"] == pytest.approx(both, rel=1e-5)


# ----------------------------------------------------------------------------- compatibility
def test_a_run_directory_written_before_this_issue_loads_and_resumes_exactly(tmp_path):
    """tests/data/run_v0_1: FVSBN on 100 thresholded digits, 7 of 20 steps (mid-epoch), written by
    pixelchain 0.1.0 (masks in the weights, no digests). Resumed here it ends where a run that was
    never interrupted ends."""
    train = pc.data.load("digits", "train", binarize="threshold").subset(slice(0, 100))
    valid = pc.data.load("digits", "valid", binarize="threshold").subset(slice(0, 40))
    kwargs = dict(epochs=4, batch_size=20, lr=1e-2, lr_decay=0.5, amp=False, progress=False)  # 0.1.0: fp32
    old = shutil.copytree(OLD_RUN, tmp_path / "old")
    assert pc.load(old).name == "fvsbn"
    pc.fit(pc.create("fvsbn", (1, 8, 8), 2), train, valid, run_dir=old, resume=True, **kwargs)
    torch.manual_seed(0)
    pc.fit(pc.create("fvsbn", (1, 8, 8), 2), train, valid, run_dir=tmp_path / "new", **kwargs)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(records(old)) == strip(records(tmp_path / "new"))
    resumed, fresh = RunDir(old).read_state()[0], RunDir(tmp_path / "new").read_state()[0]
    for key, value in fresh.items():
        if key.startswith("model."):
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
