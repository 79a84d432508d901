"""What the benchmark scripts share: timing, the machine's description, BENCHMARKS.md sections."""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pixelchain import runtime
from pixelchain.train import write_trainer_state

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
# What each benchmark run measured (result.json, metrics.jsonl), committed: run directories stay on
# the machine that trained them, the tables are built from these records.
RECORDS = Path(__file__).resolve().parent / "records"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Benchmarks read dataset copies from a shared/data folder beside the repository, where there is
# one, unless PIXELCHAIN_DATA says otherwise.
if "PIXELCHAIN_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["PIXELCHAIN_DATA"] = str(SHARED_DATA)


def keep_record(run_dir: Path, table: str) -> Path:
    """Copy ``run_dir``'s result.json and metrics.jsonl (when there) to RECORDS/table/RUN; returns it."""
    record = RECORDS / table / run_dir.name
    record.mkdir(parents=True, exist_ok=True)
    for name in ("result.json", "metrics.jsonl"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, record / name)
    return record


def write_shipped_position(run_dir: Path, model: torch.nn.Module, result: dict, train: dict, images: int) -> None:
    """A trainer state in ``run_dir`` that continues a shipped run: ``model``'s weights, the position
    its ``result`` records (step, epoch, time, the learning rate of its schedule ``train`` at that
    epoch, with ``images`` training images an epoch), fresh Adam moments."""
    epoch, batch = divmod(result["steps"], math.ceil(images / train["batch_size"]))
    write_trainer_state(
        run_dir, model, lr=train["lr"] * train.get("lr_decay", 1.0) ** epoch,
        weight_decay=train.get("weight_decay", 0.0), step=result["steps"], epoch=epoch, batch=batch,
        elapsed=result["train_seconds"], images=round(result["images_per_s"] * result["train_seconds"]),
        best_valid=result["best_valid_nll"])


def machine() -> str:
    """One line: CPU, cores, threads, torch version (and the GPU when one is used)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    pinned = runtime.allocator_pinned()
    mmap = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    malloc = (f"malloc mmap threshold {pinned[0] >> 20} MiB" if pinned else
              f"malloc mmap threshold {int(mmap) >> 20} MiB (environment)" if mmap else "glibc's default malloc")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{malloc}{gpu}")


def matmul_gflops(repeats: int = 20) -> float:
    """A speed reading of the machine right now: fp32 GFLOP/s of a [128, 784] x [784, 8000] matmul
    (MADE's first layer at pytorch-generative's size). Shared, noisy machines vary by 2x and more
    between hours; figures measured at different times compare only through such a reading."""
    a, w = torch.randn(128, 784), torch.randn(784, 8000)
    seconds = median_time(lambda: a @ w, repeats, warmup=3)
    return 2 * 128 * 784 * 8000 / seconds / 1e9


class Stopwatch:
    """The benchmarks' one timer, of wall time with queued GPU work included: of a block,
    ``with Stopwatch() as t: ...`` then ``t.seconds``; or running since it was made,
    ``t = Stopwatch()`` ... ``t.seconds``."""

    def __init__(self) -> None:
        self.start, self.end = time.perf_counter(), None

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._now()

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self._now() if self.end is None else self.end) - self.start


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Stopwatch() as t:
            fn()
        times.append(t.seconds)
    return statistics.median(times)


def figures_dir(args) -> Path:
    """Where a benchmark draws its figures: ``args.figures_dir``, or under ``args.no_write`` a folder of
    ``args.work_dir``, so that a run told to leave BENCHMARKS.md alone does not replace the figures it shows."""
    return Path(args.work_dir) / "figures" if args.no_write else Path(args.figures_dir)


def write_section(name: str, body: str) -> None:
    """Replace the section ``name`` of BENCHMARKS.md (between its markers) with ``body``, stamped
    with the command that produced it and the date."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    script = Path(sys.argv[0])
    if script.parent == Path(__file__).parent:  # python -m benchmarks.NAME (or the file's path)
        command = " ".join(["python -m", f"benchmarks.{script.stem}", *sys.argv[1:]])
    else:
        command = " ".join(["python", *sys.argv])
    stamp = f"_Measured {time.strftime('%Y-%m-%d')} by `{command}`._\n\n"
    block = f"{start}\n{stamp}{body.rstrip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    BENCHMARKS_MD.write_text(text)
