"""Training and evaluation throughput at pytorch-generative's architectures, beside the peer.

    python -m benchmarks.throughput --peer /path/to/pytorch-generative

Train = forward + backward + Adam step on a batch of binary 28x28 images (128; the Transformer 32), as
``pc.fit`` does it by default: the intra-op threads ``fit`` chooses under the process setting (``--threads``)
and bf16 autocast where the CPU runs it natively (``--no-amp``: fp32); eval = ``log_prob`` of the batch
without gradients, in fp32 as the library reports likelihoods. The peer trains as it does by default, in fp32.
With ``--peer`` the peer's model of the same architecture (``benchmarks.peer``) is timed in the
same process, interleaved with ours round by round (same batch, process thread setting, allocator),
with its own loss; the ratios are of medians over ``--rounds``. Peak memory of a training step is
the growth of a process's peak RSS over its first step (weights' gradients and Adam's state
included), ours and the peer's each in a fresh process: in one process, memory that an earlier
step freed and the allocator kept would hide the later one's. Convolutional and attention models
are also timed through ``torch.compile`` (``--modes compiled``). Writes BENCHMARKS.md's
"throughput" section.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks import peer
from benchmarks.common import machine, matmul_gflops, median_time, write_section
from pixelchain import runtime
from pixelchain.runtime import intra_op_threads, threads_for
from pixelchain.train import adam

COMPILED = {"pixelcnn", "gated_pixelcnn", "transformer"}
LABELS = {
    "nade": "NADE, hidden 500",
    "made": "MADE, hidden [8000], 1 mask",
    "fvsbn": "FVSBN, 784 conditionals",
    "pixelcnn": "PixelCNN, 15 blocks, 16 channels, head 32",
    "gated_pixelcnn": "Gated PixelCNN, 10 layers, 128 channels, head 32",
    "transformer": "Transformer (ImageGPT), 8 blocks, 2 heads, 64 channels",
}


def effective_parameters(model: torch.nn.Module) -> int:
    """Parameters that can be non-zero: masked-out weights are stored but never used."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            mask = getattr(module, "mask", None) if name == "weight" else None
            total += int(mask.expand_as(p).count_nonzero()) if mask is not None else p.numel()
    return total


# The peer's ImageGPT keeps [B, heads, 784, 784] attention maps: ~15-21 GB at 128 images, more than
# this machine can spare beside other jobs.
DEFAULT_BATCH = {"transformer": 32}


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM of /proc/self/status, which exec resets.
    (getrusage's ru_maxrss carries over exec on Linux: a child forked from a large parent would
    start at the parent's size and show no growth.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


def peak_growth_mb(step) -> float:
    """Growth of the process's peak resident memory (MB) over one call of ``step``."""
    before = peak_rss_mb()
    step()
    return peak_rss_mb() - before


def first_step_memory_mb(side: str, name: str, batch: int, threads: int, args: argparse.Namespace) -> float:
    """Peak memory growth (MB) of ``side``'s ("ours" or "peer") first training step of ``name`` at
    ``batch``, measured in a fresh process (``--memory-of``)."""
    command = [sys.executable, "-m", "benchmarks.throughput", "--memory-of", side, "--models", name,
               "--batch", str(batch), "--threads", str(threads), "--amp" if args.amp else "--no-amp"]
    command += ["--peer", args.peer] if args.peer else []
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help="a checkout of EugenHotaj/pytorch-generative (outside this repo)")
    parser.add_argument("--batch", type=int, help="images per step (default: 128; 32 for the Transformer, "
                        "whose peer ImageGPT would need ~15-21 GB at 128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and side (1 for the "
                        "Gated PixelCNN and the Transformer, whose peer steps take tens of seconds)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="process thread settings, each a set of rows")
    parser.add_argument("--models", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="train ours under bf16 autocast where the CPU runs it natively, as pc.fit does by default")
    # first_step_memory_mb's child: print the peak memory growth of one training step (--models' first)
    parser.add_argument("--memory-of", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    runtime.configure_allocator()
    peer_models = peer.import_peer(args.peer) if args.peer else None
    before = 0.0 if args.memory_of else matmul_gflops()
    amp = args.amp and runtime.bf16_supported(torch.device("cpu"))

    lines = ["| architecture | batch | threads | mode | ours: training precision | ours: parameters (used) "
             "| ours train img/s | peer train img/s | ratio | ours eval img/s | peer eval img/s | ratio "
             "| train-step peak memory growth, ours / peer (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, process_threads in [(n, t) for t in args.threads for n in args.models]:
        batch = args.batch or DEFAULT_BATCH.get(name, 128)
        x = torch.randint(0, 2, (batch, 1, 28, 28), generator=torch.Generator().manual_seed(0))
        xf = x.float()
        torch.set_num_threads(process_threads)
        hparams = peer.MODELS[name][0]
        torch.manual_seed(0)
        model = pc.create(name, (1, 28, 28), 2, **hparams)
        optimizer = adam(model, lr=1e-4)
        theirs = peer.build(peer_models, name) if peer_models else None
        their_optimizer = torch.optim.Adam(theirs.parameters(), lr=1e-4) if theirs else None
        threads = threads_for(model.op_work(batch), "train")  # what pc.fit runs the model with
        params = sum(p.numel() for p in model.parameters())
        for mode in [m for m in args.modes if m == "eager" or name in COMPILED]:
            net = torch.compile(model) if mode == "compiled" else model

            def train_step():
                with intra_op_threads(threads):  # noqa: B023
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                        out = net(x)  # noqa: B023
                    loss = -model.log_likelihood(out.float(), x).mean()  # noqa: B023
                    optimizer.zero_grad(set_to_none=True)  # noqa: B023
                    loss.backward()
                    optimizer.step()  # noqa: B023

            def eval_step():
                with torch.no_grad():
                    model.log_prob(x) if mode == "eager" else model.log_likelihood(net(x), x)  # noqa: B023

            def peer_train():
                loss = peer.loss(theirs, xf)  # noqa: B023
                their_optimizer.zero_grad(set_to_none=True)  # noqa: B023
                loss.backward()
                their_optimizer.step()  # noqa: B023

            def peer_eval():
                with torch.no_grad():
                    peer.loss(theirs, xf)  # noqa: B023

            if args.memory_of:
                model.train()
                print(peak_growth_mb(train_step if args.memory_of == "ours" else peer_train))
                return
            memory = ""
            if mode == "eager":
                ours_mb = first_step_memory_mb("ours", name, batch, process_threads, args)
                theirs_mb = first_step_memory_mb("peer", name, batch, process_threads, args) if theirs else float("nan")
                memory = f"{ours_mb:,.0f} / {theirs_mb:,.0f}"
            times = {k: [] for k in ("train", "peer_train", "eval", "peer_eval")}
            steps = 1 if name in ("gated_pixelcnn", "transformer") else args.steps
            for r in range(args.rounds):
                warm = 1 if r == 0 else 0
                # which side goes first alternates: a step that follows a lighter one (an evaluation)
                # pays for the pages the allocator gave back in between
                sides = [("train", model, train_step), ("peer_train", theirs, peer_train)]
                sides += [("eval", model, eval_step), ("peer_eval", theirs, peer_eval)]
                for i in ((0, 1, 2, 3) if r % 2 == 0 else (1, 0, 3, 2)):
                    key, module, step = sides[i]
                    if module is not None:
                        module.train(key.endswith("train"))
                        times[key].append(median_time(step, steps, warmup=warm))
            rate = {k: batch / statistics.median(v) if v else float("nan") for k, v in times.items()}
            lines.append(
                f"| {LABELS[name]} | {batch} | {process_threads} | {mode} | {'bf16 autocast' if amp else 'fp32'} "
                f"| {params:,} ({effective_parameters(model):,}) | {rate['train']:,.1f} "
                f"| {rate['peer_train']:,.1f} | {rate['train'] / rate['peer_train']:.2f}× | {rate['eval']:,.1f} "
                f"| {rate['peer_eval']:,.1f} | {rate['eval'] / rate['peer_eval']:.2f}× | {memory} |")
            print(lines[-1], flush=True)
            write(args, before, lines)  # after every row: a run cut short leaves the rows it measured
def write(args: argparse.Namespace, before: float, lines: list[str]) -> None:
    measured = f"pytorch-generative at commit {peer.commit(args.peer)}" if args.peer else "no peer (--peer not given)"
    write_section("throughput", f"Machine: {machine()}; shared with other jobs while measured, so only the "
                  f"ratios (ours and the peer's interleaved in one process) carry over. Peer: {measured}, "
                  f"its architectures and loss as its reproduce() functions. Median of "
                  f"{args.rounds} rounds of {args.steps} steps (1 for the two largest) after warm-up. Reference "
                  f"matmul (`benchmarks.common.matmul_gflops`) before the rows: {before:.0f} GFLOP/s, after the "
                  f"last row: {matmul_gflops():.0f}.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
