"""Cached vs naive decoding for every model at 1x28x28 (binary), batch 1, 16 and 64.

    python -m benchmarks.decoding

For each model (the shipped bMNIST architectures, plus PixelCNN and Gated PixelCNN at
pytorch-generative's sizes) and batch size: the wall time of cached sampling (all 784 steps), of
naive sampling (a full forward pass per step: the first ``--naive-steps`` steps are timed and the
total extrapolated to 784, as the table says), the speedup, and the cached time in units of one
teacher-forced forward pass of the same batch (the floor is about 1). Writes BENCHMARKS.md's
"decoding" section.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pixelchain as pc
from benchmarks.common import machine, median_time, write_section
from benchmarks.train_bmnist import PRESETS
from pixelchain import runtime
from pixelchain.decode import NaiveDecoder, Sample

# One architecture per family: the benchmarked bMNIST presets that ship as checkpoints.
MODELS = ["fvsbn", "nade", "made", "pixelcnn_cpu", "gated_pixelcnn_cpu", "pixelcnn_pp_cpu", "row_lstm_cpu",
          "diagonal_bilstm_cpu", "transformer_cpu"]
PEER_SIZES = {
    "pixelcnn (peer size)": ("pixelcnn", {"channels": 16, "num_blocks": 15, "head_channels": 32}),
    "gated_pixelcnn (peer size)": ("gated_pixelcnn", {"channels": 128, "num_layers": 10, "head_channels": 32}),
}
TARGETS = {"gated_pixelcnn": "≥ 30×, ≤ 10 units", "pixelcnn": "≥ 30×, ≤ 10 units", "nade": "≥ 100×",
           "transformer": "≥ 10×"}  # by model family (the targets at batch 64)
# pytorch-generative sampling 64 binary 28x28 images at these sizes (../shared/peers.md, this machine)
PEER_SAMPLE_64 = {"nade": "0.06", "pixelcnn (peer size)": "48.0", "gated_pixelcnn (peer size)": "~1,422"}


def naive_seconds(model, batch: int, steps: int) -> float:
    """Seconds for the first ``steps`` naive steps, extrapolated to every dimension."""
    x = torch.zeros(batch, *model.image_shape, dtype=torch.long)
    decoder, policy = NaiveDecoder(model, x), Sample(torch.Generator().manual_seed(0))
    order = model.decoding_order()
    with torch.no_grad():
        decoder.conditional(0, *order[0])  # warm-up
        start = time.perf_counter()
        for step, (c, h, w) in enumerate(order[:steps]):
            x[:, c, h, w] = policy(decoder.conditional(step, c, h, w), c, h, w)
    return (time.perf_counter() - start) / steps * len(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--naive-steps", type=int, default=8)
    parser.add_argument("--models", nargs="+", help="preset names (default: all, and the peer sizes)")
    args = parser.parse_args()
    runtime.configure_allocator()

    configs = {name: PRESETS[name][:2] for name in MODELS}
    configs.update(PEER_SIZES)
    if args.models:
        configs = {k: v for k, v in configs.items() if k in args.models}
    rows = ["| model | batch | forward (s) | naive (s, extrapolated) | cached (s) | speedup | cached / forward "
            "| target at 64 | peer sampler at 64 (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, (name, hparams) in configs.items():
        torch.manual_seed(0)
        model = pc.create(name, (1, 28, 28), 2, **hparams).eval()
        for batch in args.batches:
            x = torch.randint(0, 2, (batch, 1, 28, 28))
            with torch.no_grad():
                forward = median_time(lambda: model(x), repeats=3, warmup=1)  # noqa: B023
            naive = naive_seconds(model, batch, args.naive_steps)
            cached = statistics.median(
                timed(lambda: model.sample(batch, generator=torch.Generator().manual_seed(0)))  # noqa: B023
                for _ in range(2)
            )
            target, peer = (TARGETS.get(name, ""), PEER_SAMPLE_64.get(label, "")) if batch == 64 else ("", "")
            rows.append(f"| {label} | {batch} | {forward:.4f} | {naive:.1f} | {cached:.2f} | {naive / cached:.0f}× "
                        f"| {cached / forward:.1f} | {target} | {peer} |")
            print(rows[-1], flush=True)
    body = (f"Machine: {machine()}.\n\nNaive = one full forward pass per step (first {args.naive_steps} steps "
            "timed, scaled to 784); cached = the model's incremental decoder, all 784 steps.\n\n" + "\n".join(rows))
    write_section("decoding", body)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
