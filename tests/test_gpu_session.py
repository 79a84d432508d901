"""benchmarks/gpu_session.py's bookkeeping (the training it launches is train_bmnist's and
pixelchain train's): how each job starts, and the packing of what comes back into at most 8 files
of 15 MiB, unpacked here."""

import argparse
import json

from benchmarks import gpu_session
from pixelchain.train import STATE

FRESH = gpu_session.Job("fmnist_pixelcnn_pp_48", train=("pixelcnn_pp", "--dataset", "fashion_mnist", "--set",
                                                       "channels=48", "--set", "head='mixture'"))


def test_each_job_starts_where_the_repository_left_it(tmp_path):
    Job, start = gpu_session.Job, gpu_session.start_option
    assert start(Job("gated_pixelcnn", preset="gated_pixelcnn"), tmp_path) == ["--from-shipped"]  # unfinished
    assert start(Job("pixelcnn", preset="pixelcnn"), tmp_path) is None  # shipped, early-stopped
    assert start(Job("pixelcnn_drop10", preset="pixelcnn_drop10"), tmp_path) == []  # never trained
    (tmp_path / "pixelcnn_drop10").mkdir()
    (tmp_path / "pixelcnn_drop10" / STATE).touch()
    assert start(Job("pixelcnn_drop10", preset="pixelcnn_drop10"), tmp_path) == ["--resume"]  # this session's
    assert start(gpu_session.BY_NAME["fmnist_pixelcnn_pp"], tmp_path) == ["--from-shipped"]
    assert start(FRESH, tmp_path) == []
    # a continued checkpoint is seeded by its continue_runs job (whose table holds the record's curve)
    continued = {j.name for j in gpu_session.CONTINUED}
    assert all(job.shipped in continued for job in gpu_session.JOBS if job.shipped)


def test_a_pixelchain_train_job_starts_fresh_then_resumes_its_run(tmp_path):
    job = FRESH
    argv = gpu_session.command(job, tmp_path, [], "cuda", 60.0)
    assert argv[1:4] == ["-m", "pixelchain.cli", "train"] and "head='mixture'" in argv
    assert argv[argv.index("--run-dir") + 1] == str(tmp_path / job.name) and "--amp" in argv
    (tmp_path / job.name).mkdir()
    (tmp_path / job.name / "config.json").write_text(json.dumps(
        {"model": "pixelcnn_pp", "args": {"image_shape": [1, 28, 28], "num_levels": 256}}))
    argv = gpu_session.command(job, tmp_path, ["--resume"], "cpu", 60.0)
    assert argv[3:6] == ["train", "pixelcnn_pp", "--resume"] and "--no-amp" in argv and "--set" not in argv
    # a job's own arguments reach a resumed pixelchain-train run too, as they reach a preset's
    lifted = gpu_session.Job("lifted", shipped="fmnist_pixelcnn_pp", extra=("--max-steps", "1000000"))
    (tmp_path / "lifted").mkdir()
    (tmp_path / "lifted" / "config.json").write_text((tmp_path / job.name / "config.json").read_text())
    argv = gpu_session.command(lifted, tmp_path, ["--resume"], "cuda", 60.0)
    assert argv[argv.index("--max-steps") + 1] == "1000000"


def test_pack_and_unpack(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "ARCHIVE_BYTES", 20_000)
    runs, out = tmp_path / "runs", tmp_path / "out"
    sizes = {"a": 3_000, "b": 3_000, "c": 30_000, "e": 0}  # a, b share an archive; c's stay there; e has none
    for preset, size in sizes.items():
        (runs / preset).mkdir(parents=True)
        result = {"test": {"nll": 90.0, "n": 10}, "best_valid_nll": 91.0, "epochs": 1, "steps": 10,
                  "train_seconds": 60.0, "images_per_s": 1.0, "finished": False}
        (runs / preset / "result.json").write_text(json.dumps(result))
        (runs / preset / "metrics.jsonl").write_text("{}\n")
        (runs / preset / "config.json").write_text("{}")
        if size:
            (runs / preset / "model.safetensors").write_bytes(b"0" * size)
    (runs / "d.log").write_text("Traceback")
    lines = gpu_session.pack(runs, ["a", "b", "c", "d", "e"], out)
    assert sorted(p.name for p in out.iterdir()) == ["records.tar.gz", "summary.txt", "weights_1.tar"]
    assert lines[0].startswith("a: test nll 90.0000 (best valid NLL 91.0000) after 1 epochs")
    assert "weights 0.0 MiB stay there" in lines[2] and lines[3] == "d: no result (see its train.log)"
    assert lines[4].endswith("; no weights")
    gpu_session.unpack(argparse.Namespace(files=str(out), runs_dir=str(tmp_path / "back")))
    back = tmp_path / "back"
    assert (back / "a" / "model.safetensors").read_bytes() == b"0" * 3_000
    assert (back / "b" / "model.safetensors").is_file() and not (back / "c" / "model.safetensors").exists()
    assert (back / "c" / "metrics.jsonl").is_file() and (back / "d" / "train.log").read_text() == "Traceback"


def test_trim_sets_aside_the_weights_no_job_needs_and_restore_puts_them_back(tmp_path, monkeypatch):
    shipped, aside = tmp_path / "checkpoints", tmp_path / ".aside"
    for name in ("bmnist_transformer", "bmnist_nade", "fmnist_pixelcnn_pp"):
        (shipped / name).mkdir(parents=True)
        (shipped / name / "model.safetensors").write_bytes(name.encode())
        (shipped / name / "config.json").write_text("{}")
    monkeypatch.setattr(gpu_session, "PRETRAINED_DIR", shipped)
    monkeypatch.setattr(gpu_session, "ASIDE", aside)
    gpu_session.trim(argparse.Namespace(jobs=["transformer", "fmnist_pixelcnn_pp"]))
    assert sorted(p.parent.name for p in shipped.glob("*/model.safetensors")) == ["bmnist_transformer",
                                                                                  "fmnist_pixelcnn_pp"]
    assert (aside / "bmnist_nade" / "model.safetensors").read_bytes() == b"bmnist_nade"
    assert (shipped / "bmnist_nade" / "config.json").is_file()  # only the weights travel aside
    gpu_session.restore(argparse.Namespace())
    assert (shipped / "bmnist_nade" / "model.safetensors").read_bytes() == b"bmnist_nade"
    assert not list(aside.glob("*/model.safetensors"))
