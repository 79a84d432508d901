"""The training levers side by side: NLL reached after equal wall-clock, per family and setting.

    python -m benchmarks.levers gated_pixelcnn_cpu pixelcnn_pp_cpu --minutes 6 --slice 30
    python -m benchmarks.levers gated_pixelcnn_cpu --minutes 0.5 --slice 10 --eval-images 200 --no-write  # smoke

For each binarized-MNIST preset (benchmarks/train_bmnist.py), every setting in ``SETTINGS`` trains
the same initial weights through ``pc.fit`` for the same training time. The settings take turns in
slices of ``--slice`` seconds (round robin, resuming their own run directories), so that the
machine's load drifts over all of them alike; a compiled setting trains in one slice (each fit call
compiles anew). Then each model's validation NLL is scored in fp32
on ``--eval-images`` images (every k-th), and the table (steps, images/s, NLL at equal time, and
the speed and NLL against fp32 at one thread) is printed and written to BENCHMARKS.md. A faster
step that reaches a worse NLL in the same time does not win.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks.common import machine, write_section
from benchmarks.train_bmnist import PRESETS
from pixelchain import runtime
from pixelchain.run_dir import STATE

# name -> (intra-op threads (0: every core), bf16 autocast, torch.compile, batch-size factor); the
# learning rate scales with the square root of the batch-size factor.
SETTINGS: dict[str, tuple[int, bool, bool, int]] = {
    "fp32, 1 thread": (1, False, False, 1),
    "bf16, 1 thread": (1, True, False, 1),
    "fp32, all cores": (0, False, False, 1),
    "bf16, all cores": (0, True, False, 1),
    "bf16, all cores, compile": (0, True, True, 1),
    "bf16, all cores, 2x batch": (0, True, False, 2),
}


def run_family(preset: str, seconds: float, slice_s: float, eval_images: int, root: Path) -> list[dict]:
    """Train every setting of ``SETTINGS`` on ``preset`` for ``seconds``; one row per setting."""
    name, hparams, settings = PRESETS[preset]
    train, valid = pc.data.load("binarized_mnist", "train"), pc.data.load("binarized_mnist", "valid")
    valid = valid.subset(slice(0, None, max(1, len(valid) // eval_images)))
    torch.manual_seed(0)
    initial = pc.create(name, train.image_shape, train.num_levels, **hparams)
    cores = torch.get_num_threads()
    models = {s: copy.deepcopy(initial) for s in SETTINGS}
    trained = dict.fromkeys(SETTINGS, 0.0)
    summaries: dict[str, dict] = {}
    while min(trained.values()) < seconds:
        for setting, (threads, amp, compile, factor) in SETTINGS.items():
            # a compiled model compiles again at every fit call: its time comes in one slice
            budget = min(seconds if compile else slice_s, seconds - trained[setting])
            if budget <= 0:
                continue
            torch.set_num_threads(threads or cores)
            run_dir = root / preset / setting.replace(", ", "_").replace(" ", "")
            resume = (run_dir / STATE).is_file()
            summary = pc.fit(models[setting], train, None, run_dir=run_dir, resume=resume, epochs=1000, max_time=budget,
                             amp=amp, compile=compile,
                             batch_size=settings["batch_size"] * factor, lr=settings["lr"] * factor ** 0.5,
                             lr_decay=settings.get("lr_decay", 1.0), grad_clip=settings.get("grad_clip"))
            trained[setting], summaries[setting] = summary["elapsed"], summary
            print(f"  {preset} / {setting}: {summary['elapsed']:.0f} s, {summary['step']} steps", flush=True)
    torch.set_num_threads(cores)
    rows = []
    for setting, model in models.items():
        nll = pc.evaluate(model.eval(), valid)["nll"]
        s = summaries[setting]
        rows.append({"preset": preset, "setting": setting, "steps": s["step"], "seconds": s["elapsed"],
                     "images_per_s": s["images_per_s"], "valid_nll": nll})
    return rows


def table(rows: list[dict], eval_images: int) -> str:
    lines = ["| preset | setting | steps | train img/s | speed vs fp32 1 thread | valid NLL at equal time (nats) "
             "| vs fp32 1 thread |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["preset"] == row["preset"] and r["setting"] == "fp32, 1 thread")
        lines.append(f"| {row['preset']} | {row['setting']} | {row['steps']} | {row['images_per_s']:.0f} "
                     f"| {row['images_per_s'] / base['images_per_s']:.2f}x | {row['valid_nll']:.2f} "
                     f"| {row['valid_nll'] - base['valid_nll']:+.2f} |")
    return "\n".join(lines) + (f"\n\nValidation NLL on {eval_images} images (every k-th), fp32, after "
                               f"{rows[0]['seconds']:.0f} s of training per setting; {machine()}.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+", choices=sorted(PRESETS))
    parser.add_argument("--minutes", type=float, default=6.0, help="training time per setting")
    parser.add_argument("--slice", type=float, default=30.0, help="seconds a setting trains per turn")
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    runtime.configure_allocator()
    with tempfile.TemporaryDirectory() as root:
        rows = [r for p in args.presets for r in run_family(p, args.minutes * 60, args.slice, args.eval_images,
                                                             Path(root))]
    text = table(rows, args.eval_images)
    print(text)
    if not args.no_write:
        write_section("levers", f"Training levers at equal wall-clock:\n\n{text}")


if __name__ == "__main__":
    main()
