"""Test-suite settings: read the local dataset copies, never download, keep the cache private."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

if "PIXELCHAIN_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["PIXELCHAIN_DATA"] = str(SHARED_DATA)
os.environ.setdefault("PIXELCHAIN_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty cache directory, so no test depends on another's downloads."""
    monkeypatch.setenv("PIXELCHAIN_CACHE", str(tmp_path_factory.mktemp("cache")))


def data_root(name: str) -> Path:
    """Folder holding the local copy of dataset ``name``; skips the test when it is absent."""
    for root in os.environ.get("PIXELCHAIN_DATA", "").split(os.pathsep):
        if root and (Path(root) / name).is_dir():
            return Path(root) / name
    if name == "fashion_mnist" and Path("/usr/share/datasets/fashion-mnist").is_dir():
        return Path("/usr/share/datasets/fashion-mnist")
    pytest.skip(f"local copy of {name} not found (set PIXELCHAIN_DATA)")


def train_under_torchrun(run: Path, batch_size: int, epochs: int) -> subprocess.CompletedProcess:
    """``pixelchain train fully_visible`` on the digits in two gloo processes (one thread each);
    asserts it exited cleanly and returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "pixelchain.cli", "train",
           "fully_visible", "--dataset", "digits", "--run-dir", str(run), "--epochs", str(epochs), "--batch-size",
           str(batch_size), "--no-figures"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done
