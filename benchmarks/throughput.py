"""Training and evaluation throughput at pytorch-generative's architectures, on this CPU.

    python -m benchmarks.throughput

Train = forward + backward + Adam step on a batch of 128 binary 28x28 images, as ``pc.fit`` does
it; eval = ``log_prob`` of the batch without gradients. Median of ``--repeats`` after warm-up.
Convolutional and attention models are also timed through ``torch.compile`` (``pc.fit(compile=
True)``, ``pixelchain train --compile``), in the same run, after the compilation warm-up.
The peer figures come from ../shared/peers.md (measured on a machine of this kind with glibc's
mmap threshold pinned at 64 MiB; noise about +-20%, so only clear ratios mean something). Ours run
with the threshold pixelchain's entry points pin (``pixelchain.runtime``, 1 GiB), or
``--malloc-mib 64`` for the peer's. Writes BENCHMARKS.md's "throughput" section.
"""

from __future__ import annotations

import argparse

import torch

import pixelchain as pc
from benchmarks.common import machine, matmul_gflops, median_time, write_section
from pixelchain import runtime
from pixelchain.train import adam

COMPILED = {"pixelcnn", "gated_pixelcnn", "transformer"}
# label -> (our model, hyperparameters, peer params, peer train img/s, peer eval img/s)
ROWS = {
    "NADE, hidden 500": ("nade", {"hidden": 500}, 785_284, 374, 2_145),
    "MADE, hidden [8000], 1 mask": ("made", {"hidden": (8000,)}, 12_552_784, 1_842, 5_448),
    "FVSBN, 784 conditionals": ("fvsbn", {}, 307_721, 2_063, 13_125),
    "PixelCNN, 15 blocks, 16 channels, head 32": (
        "pixelcnn", {"channels": 16, "num_blocks": 15, "head_channels": 32}, 53_569, 331, 1_126),
    "Gated PixelCNN, 10 layers, 128 channels, head 32": (
        "gated_pixelcnn", {"channels": 128, "num_layers": 10, "head_channels": 32}, 3_364_161, 7.1, 34),
    "Transformer (ImageGPT), 8 blocks, 2 heads, 64 channels": (
        "transformer", {"dim": 64, "num_layers": 8, "num_heads": 2}, 401_489, 4.6, 12.2),
}


def effective_parameters(model: torch.nn.Module) -> int:
    """Parameters that can be non-zero: masked-out weights are stored but never used."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            mask = getattr(module, "mask", None) if name == "weight" else None
            total += int(mask.expand_as(p).count_nonzero()) if mask is not None else p.numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", help="substrings of the row labels to run")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--malloc-mib", type=int, default=1024, help="glibc mmap threshold (the peer's: 64)")
    args = parser.parse_args()
    runtime.configure_allocator(args.malloc_mib << 20, 2 * args.malloc_mib << 20)
    before = matmul_gflops()

    lines = ["| architecture | mode | ours: parameters (used) | peer parameters | ours train img/s | peer train img/s "
             "| ratio | ours eval img/s | peer eval img/s | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, (name, hparams, peer_params, peer_train, peer_eval) in ROWS.items():
        if args.rows and not any(r.lower() in label.lower() for r in args.rows):
            continue
        torch.manual_seed(0)
        model = pc.create(name, (1, 28, 28), 2, **hparams)
        optimizer = adam(model, lr=1e-4)
        x = torch.randint(0, 2, (args.batch, 1, 28, 28))
        params = sum(p.numel() for p in model.parameters())
        for mode in [m for m in args.modes if m == "eager" or name in COMPILED]:
            net = torch.compile(model) if mode == "compiled" else model

            def train_step():
                loss = -model.log_likelihood(net(x), x).mean()  # noqa: B023
                optimizer.zero_grad(set_to_none=True)  # noqa: B023
                loss.backward()
                optimizer.step()  # noqa: B023

            def eval_step():
                with torch.no_grad():
                    model.log_likelihood(net(x), x)  # noqa: B023

            model.train()
            train = args.batch / median_time(train_step, args.repeats, warmup=2)
            model.eval()
            evaluation = args.batch / median_time(eval_step, args.repeats, warmup=2)
            lines.append(f"| {label} | {mode} | {params:,} ({effective_parameters(model):,}) | {peer_params:,} "
                         f"| {train:,.1f} | {peer_train:,} | {train / peer_train:.2f}× | {evaluation:,.1f} "
                         f"| {peer_eval:,} | {evaluation / peer_eval:.2f}× |")
            print(lines[-1], flush=True)
    after = matmul_gflops()
    write_section("throughput", f"Machine: {machine()}. Batch {args.batch}, median of {args.repeats} after "
                  f"warm-up. Reference matmul (``benchmarks.common.matmul_gflops``): {before:.0f} GFLOP/s before "
                  f"the rows, {after:.0f} after.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
