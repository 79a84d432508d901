"""Steady under load: decoding, evaluation and training with the machine idle and with one core busy.

    python -m benchmarks.load

Each row is timed with the machine as it is ("idle") and with a busy-loop process pinned on one
core (``taskset -c 1``), and the ratio loaded / idle printed; once with the intra-op threads the
library's policy chooses (``runtime.THREADS``: one thread for the small ops of a cached decoding
step or a small model, and for training and evaluation no more threads than the cores other
processes leave free) and once with every op at the process setting (``--threads``).
Writes BENCHMARKS.md's "load" section.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

import pixelchain as pc
from benchmarks.common import Stopwatch, machine, write_section
from benchmarks.train_bmnist import PRESETS
from pixelchain import runtime
from pixelchain.runtime import intra_op_threads, threads_for
from pixelchain.train import adam

PEER_PIXELCNN = ("pixelcnn", {"channels": 16, "num_blocks": 15, "head_channels": 32})
# label -> (what is timed, model name, hyperparameters, batch)
ROWS = {
    "sample 64, PixelCNN (32 channels, 6 blocks)": ("sample", *PRESETS["pixelcnn_cpu"][:2], 64),
    "sample 64, Gated PixelCNN (32 channels, 6 layers)": ("sample", *PRESETS["gated_pixelcnn_cpu"][:2], 64),
    "sample 16, Transformer (dim 32, 3 layers)": ("sample", *PRESETS["transformer_cpu"][:2], 16),
    "sample 64, NADE (hidden 500)": ("sample", "nade", {"hidden": 500}, 64),
    "train step 128, PixelCNN (16 channels, 15 blocks)": ("train", *PEER_PIXELCNN, 128),
    "train step 128, NADE (hidden 500)": ("train", "nade", {"hidden": 500}, 128),
    "eval 128, PixelCNN (16 channels, 15 blocks)": ("eval", *PEER_PIXELCNN, 128),
    "eval 128, NADE (hidden 500)": ("eval", "nade", {"hidden": 500}, 128),
}


@contextmanager
def busy_core(core: int = 1) -> Iterator[None]:
    """A busy-loop process pinned on ``core`` for the duration of the block."""
    loop = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)  # longer than the policy's look at the free cores (runtime.FreeCores)
        yield
    finally:
        loop.kill()
        loop.wait()
        time.sleep(1.5)  # the policy's next look sees the core free again


def task(kind: str, name: str, hparams: dict, batch: int) -> Callable[[], object]:
    """One call of what the row times, as the library runs it."""
    torch.manual_seed(0)
    model = pc.create(name, (1, 28, 28), 2, **hparams)
    x = torch.randint(0, 2, (batch, 1, 28, 28))
    if kind == "sample":
        model.eval()
        return lambda: model.sample(batch, generator=torch.Generator().manual_seed(0))
    if kind == "eval":
        model.eval()
        return lambda: model.log_prob(x)
    optimizer = adam(model, lr=1e-4)

    def step() -> None:
        with intra_op_threads(threads_for(model.op_work(batch), "train")):  # what pc.fit does
            loss = -model.log_prob(x).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


class _Cut(Exception):
    pass


def _cut(signum, frame) -> None:
    raise _Cut


def seconds(fn: Callable[[], object], repeats: int, limit: float) -> float:
    """Median seconds of ``fn()``; inf when a call runs past ``limit`` seconds (it is cut there)."""
    times = []
    signal.signal(signal.SIGALRM, _cut)
    for _ in range(repeats):
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            with Stopwatch() as t:
                fn()
        except _Cut:
            return math.inf
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        times.append(t.seconds)
    return statistics.median(times)


def cell(idle: float, loaded: float, limit: float) -> str:
    def show(t: float) -> str:
        return f"> {limit:.0f} (cut)" if math.isinf(t) else f"{t:.3f}"

    ratio = f"{loaded / idle:.2f}×" if not (math.isinf(idle) or math.isinf(loaded)) else "–"
    return f"{show(idle)} | {show(loaded)} | {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="the process's intra-op thread setting")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", nargs="+", help="substrings of the row labels to run")
    parser.add_argument("--limit", type=float, default=30, help="seconds after which a call is cut")
    args = parser.parse_args()
    runtime.configure_allocator()
    torch.set_num_threads(args.threads)
    library = runtime.THREADS
    everywhere = runtime.ThreadPolicy(train_work=0, decode_work=0, free_cores=lambda: None)
    lines = ["| row | library's threads: idle (s) | one core busy (s) | loaded / idle "
             f"| {args.threads} threads everywhere: idle (s) | one core busy (s) | loaded / idle |",
             "|---|---|---|---|---|---|---|"]
    for label, (kind, name, hparams, batch) in ROWS.items():
        if args.rows and not any(r.lower() in label.lower() for r in args.rows):
            continue
        fn = task(kind, name, hparams, batch)
        fn()  # warm-up
        cells = []
        for policy in (library, everywhere):
            runtime.THREADS = policy
            idle = seconds(fn, args.repeats, args.limit)
            with busy_core():
                loaded = seconds(fn, args.repeats, args.limit)
            cells.append(cell(idle, loaded, args.limit))
        runtime.THREADS = library
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        write(args, lines)  # after every row: a run cut short leaves the rows it measured


def write(args: argparse.Namespace, lines: list[str]) -> None:
    write_section("load", f"Machine: {machine()}. 'Idle' is the machine as it was: shared with other jobs "
                  "while measured, so the idle times themselves vary; the busy core is one `taskset -c 1` "
                  f"busy-loop process. Median of {args.repeats} calls after one warm-up call per row; a call "
                  f"past {args.limit:.0f} s is cut there.\n\n"
                  + "\n".join(lines))


if __name__ == "__main__":
    main()
