"""benchmarks/gpu_session.py's bookkeeping (the training it launches is train_bmnist's): how each
preset starts, and the packing of what comes back into at most 8 files of 15 MiB, unpacked here."""

import argparse
import json

from benchmarks import gpu_session
from pixelchain.train import STATE


def test_each_preset_starts_where_the_repository_left_it(tmp_path):
    assert gpu_session.start_option("gated_pixelcnn", tmp_path) == ["--from-shipped"]  # shipped, unfinished
    assert gpu_session.start_option("pixelcnn", tmp_path) is None  # shipped, early-stopped
    assert gpu_session.start_option("pixelcnn_drop10", tmp_path) == []  # never trained
    (tmp_path / "pixelcnn_drop10").mkdir()
    (tmp_path / "pixelcnn_drop10" / STATE).touch()
    assert gpu_session.start_option("pixelcnn_drop10", tmp_path) == ["--resume"]  # this session's run


def test_pack_and_unpack(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "ARCHIVE_BYTES", 20_000)
    runs, out = tmp_path / "runs", tmp_path / "out"
    sizes = {"a": 3_000, "b": 3_000, "c": 30_000}  # a and b share an archive; c's weights stay there
    for preset, size in sizes.items():
        (runs / preset).mkdir(parents=True)
        result = {"test": {"nll": 90.0}, "best_valid_nll": 91.0, "steps": 10, "train": {"batch_size": 5},
                  "train_images": 50, "train_seconds": 60.0, "images_per_s": 1.0, "finished": False}
        (runs / preset / "result.json").write_text(json.dumps(result))
        (runs / preset / "metrics.jsonl").write_text("{}\n")
        (runs / preset / "config.json").write_text("{}")
        (runs / preset / "model.safetensors").write_bytes(b"0" * size)
    (runs / "d.log").write_text("Traceback")
    lines = gpu_session.pack(runs, ["a", "b", "c", "d"], out)
    assert sorted(p.name for p in out.iterdir()) == ["records.tar.gz", "summary.txt", "weights_1.tar"]
    assert "weights 0 MiB stay there" in lines[2] and lines[3] == "d: no result (see its train.log)"
    gpu_session.unpack(argparse.Namespace(files=str(out), runs_dir=str(tmp_path / "back")))
    back = tmp_path / "back"
    assert (back / "a" / "model.safetensors").read_bytes() == b"0" * 3_000
    assert (back / "b" / "model.safetensors").is_file() and not (back / "c" / "model.safetensors").exists()
    assert (back / "c" / "metrics.jsonl").is_file() and (back / "d" / "train.log").read_text() == "Traceback"
