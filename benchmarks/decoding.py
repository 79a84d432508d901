"""Cached vs naive decoding for every model at 1x28x28 (binary), batch 1, 16 and 64, beside the peer.

    python -m benchmarks.decoding --peer /path/to/pytorch-generative

For each model (the shipped bMNIST architectures, plus PixelCNN and Gated PixelCNN at
pytorch-generative's sizes) and batch size: the wall time of cached sampling (all 784 steps), of
naive sampling (a full forward pass per step: the first ``--naive-steps`` steps are timed and the
total extrapolated to 784), the speedup, and the cached time in units of one teacher-forced
forward pass of the same batch (the floor is about 1). With ``--peer``, the peer's own sampler at
the same architecture (NADE, PixelCNN, Gated PixelCNN) is timed in the same process right after
ours: in full when it is quick, else its first pixel steps (each a full forward pass of the same
shape) scaled to 784. ``--purify N`` adds PixelDefend's purification (``MostLikelyInWindow``,
radius 16 of 256 levels) by the PixelCNN++ at the size trained for Fashion-MNIST, on N images, with
the time for 1,000 images (batches of N in turn) next to naive decoding's, extrapolated. Writes
BENCHMARKS.md's "decoding" section.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import pixelchain as pc
from benchmarks import peer
from benchmarks.common import Stopwatch, machine, median_time, write_section
from benchmarks.train_bmnist import PRESETS
from pixelchain import runtime
from pixelchain.decode import MostLikelyInWindow, NaiveDecoder, Sample, decode
from pixelchain.runtime import intra_op_threads, threads_for

# One architecture per family: the benchmarked bMNIST presets that ship as checkpoints.
MODELS = ["fvsbn", "nade", "made", "pixelcnn_cpu", "gated_pixelcnn_cpu", "pixelcnn_pp_cpu", "row_lstm_cpu",
          "diagonal_bilstm_cpu", "transformer_cpu"]
PEER_SIZES = {"pixelcnn (peer size)": "pixelcnn", "gated_pixelcnn (peer size)": "gated_pixelcnn"}
PEER_OF = {"nade": "nade", **PEER_SIZES}  # rows the peer has a sampler for
CONV_OR_ATTENTION = {"pixelcnn", "gated_pixelcnn", "pixelcnn_pp", "transformer"}
N = 28 * 28
# The PixelCNN++ PixelDefend purifies Fashion-MNIST with (1 x 28 x 28, 256 levels).
PURIFIER = {"channels": 32, "num_resnet": 1, "num_scales": 3, "num_mixtures": 5, "dropout": 0.2}


def naive_seconds(model, batch: int, steps: int, policy=None) -> float:
    """Seconds for the first ``steps`` naive steps, extrapolated to every dimension."""
    x = torch.zeros(batch, *model.image_shape, dtype=torch.long)
    decoder, policy = NaiveDecoder(model, x), policy or Sample(torch.Generator().manual_seed(0))
    order = model.decoding_order()
    with torch.no_grad(), intra_op_threads(threads_for(model.op_work(batch), "evaluate")):
        decoder.conditional(0, *order[0])  # warm-up
        with Stopwatch() as t:
            for step, (c, h, w) in enumerate(order[:steps]):
                x[:, c, h, w] = policy(decoder.conditional(step, c, h, w), c, h, w)
    return t.seconds / steps * len(order)


class _Stop(Exception):
    pass


def peer_sample_seconds(model, batch: int, budget: float) -> str:
    """The peer's sampler for ``batch`` images: in full, or (when its pixel steps, each a full
    forward pass, would take more than ``budget`` seconds in all) its first steps, extrapolated to
    784; returns the table cell."""
    calls, limit, forward = [0], [3], type(model).forward

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] > limit[0]:
            raise _Stop
        return forward(model, *args, **kwargs)

    def first_steps() -> float | None:
        """Seconds of the first ``limit`` steps, or None when the sampler finished before."""
        calls[0] = 0
        with Stopwatch() as t:
            try:
                peer.sample(model, batch)
            except _Stop:
                stopped = True
            else:
                stopped = False
        return t.seconds if stopped else None

    model.forward = counted
    try:
        probe = first_steps()
        if probe is not None and probe / limit[0] * N > budget:
            limit[0] = max(3, int(budget / 4 / (probe / limit[0])))
            return f"~{first_steps() / limit[0] * N:,.1f} ({limit[0]} steps)"
        limit[0] = N + 1
        peer.sample(model, batch)  # warm-up
        return f"{timed(lambda: peer.sample(model, batch)):.2f}"
    finally:
        del model.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help="a checkout of EugenHotaj/pytorch-generative (outside this repo)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--naive-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="the process's intra-op thread setting")
    parser.add_argument("--peer-budget", type=float, default=60, help="seconds over which the peer's sampler "
                        "is extrapolated from its first steps")
    parser.add_argument("--models", nargs="+", help="preset names (default: all, and the peer sizes)")
    parser.add_argument("--purify", type=int, default=0, help="images purified at once (0: no purification row)")
    args = parser.parse_args()
    runtime.configure_allocator()
    torch.set_num_threads(args.threads)
    peer_models = peer.import_peer(args.peer) if args.peer else None

    configs = {name: PRESETS[name][:2] for name in MODELS}
    configs.update({label: (name, peer.MODELS[name][0]) for label, name in PEER_SIZES.items()})
    if args.models:
        configs = {k: v for k, v in configs.items() if k in args.models}
    rows = ["| model | batch | forward (s) | naive (s, extrapolated) | cached (s) | speedup | cached / forward "
            "| target at 64 | peer sampler (s) | peer / ours |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, (name, hparams) in configs.items():
        torch.manual_seed(0)
        model = pc.create(name, (1, 28, 28), 2, **hparams).eval()
        theirs = peer.build(peer_models, PEER_OF[label]).eval() if peer_models and label in PEER_OF else None
        for batch in args.batches:
            x = torch.randint(0, 2, (batch, 1, 28, 28))
            with torch.no_grad(), intra_op_threads(threads_for(model.op_work(batch), "evaluate")):  # as log_prob
                forward = median_time(lambda: model(x), repeats=3, warmup=1)  # noqa: B023
            naive = naive_seconds(model, batch, args.naive_steps)
            model.sample(batch)  # warm-up
            cached = statistics.median(
                timed(lambda: model.sample(batch, generator=torch.Generator().manual_seed(0)))  # noqa: B023
                for _ in range(2)
            )
            theirs_cell = peer_sample_seconds(theirs, batch, args.peer_budget) if theirs is not None else ""
            theirs_s = float(theirs_cell.lstrip("~").split()[0].replace(",", "")) if theirs_cell else None
            target = ""
            if batch == 64:
                target = "≤ 3 forwards" if name in CONV_OR_ATTENTION else ""
                target = "≥ 2× the peer" if name == "nade" else target
            rows.append(f"| {label} | {batch} | {forward:.4f} | {naive:.1f} | {cached:.2f} | {naive / cached:.0f}× "
                        f"| {cached / forward:.1f} | {target} | {theirs_cell} "
                        f"| {f'{theirs_s / cached:.1f}×' if theirs_s else ''} |")
            print(rows[-1], flush=True)
            write(args, rows)  # after every row: a run cut short leaves the rows it measured
    if args.purify:
        rows.append(purify_row(args.purify, args.naive_steps))
        print(rows[-1], flush=True)
        write(args, rows)


def write(args: argparse.Namespace, rows: list[str]) -> None:
    measured = f"pytorch-generative at commit {peer.commit(args.peer)}" if args.peer else "no peer (--peer not given)"
    body = (f"Machine: {machine()}; shared with other jobs while measured (compare within a row). Peer: "
            f"{measured}. Naive = one full forward pass per step (first {args.naive_steps} steps timed, scaled "
            "to 784); cached = the model's incremental decoder, all 784 steps; forward and decoding run with "
            "the intra-op threads the library chooses for their work (`runtime.threads_for`). The peer's "
            "sampler: '~' marks a time extrapolated from its first pixel steps (each a full forward pass).\n\n"
            + "\n".join(rows))
    write_section("decoding", body)


def purify_row(batch: int, naive_steps: int) -> str:
    """PixelDefend's purification of ``batch`` Fashion-MNIST-sized images at 256 levels."""
    torch.manual_seed(0)
    model = pc.create("pixelcnn_pp", (1, 28, 28), 256, **PURIFIER).eval()
    x = torch.randint(0, 256, (batch, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    policy = MostLikelyInWindow(x, 16)
    with torch.no_grad(), intra_op_threads(threads_for(model.op_work(batch), "evaluate")):
        forward = median_time(lambda: model(x), repeats=3, warmup=1)
    cached = timed(lambda: decode(model, x, policy))
    naive = naive_seconds(model, batch, naive_steps, policy)
    per_1000 = 1000 / batch
    return (f"| pixelcnn_pp purify (PixelDefend, F-MNIST size, 256 levels; 1,000 images: cached "
            f"{cached * per_1000 / 60:.1f} min, naive {naive * per_1000 / 3600:.1f} h) | {batch} | {forward:.4f} "
            f"| {naive:.1f} | {cached:.2f} | {naive / cached:.0f}× | {cached / forward:.1f} | < 5 min per 1,000, "
            "≥ 30× | | |")


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn()``."""
    with Stopwatch() as t:
        fn()
    return t.seconds


if __name__ == "__main__":
    main()
