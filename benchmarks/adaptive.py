"""Adaptive attacks on PixelDefend (pixelchain.adaptive): robust accuracy, the worst case over
iterates and restarts, and its curve against steps.

    python -m benchmarks.adaptive --model fmnist_pixelcnn_pp --classifiers fmnist_resnet fmnist_vgg \
        --n 300 --eps-defend 16 32 --steps 100 --restarts 2 --work-dir runs/adaptive

Threat model: L-inf, ε_attack ``--eps`` (0-255 units), white box: classifier, density model and
purifier known. On ``--n`` Fashion-MNIST test images (the seeded permutation of
benchmarks/pixeldefend.py, its first ``--n``), for each classifier and each ``--eps-defend``:

* the simpler BPDA the issue names: 10 steps of 1 level from the image itself, and 40 steps of
  2 levels from a random start, one start each (last iterate and worst case over iterates);
* PGD through ART's estimator, ``--steps`` steps of ``--step-size`` levels, ``--restarts`` random
  starts, by each ``--routes`` gradient (identity = BPDA; surrogate = the smooth purifier);
* ART's APGD (``--apgd`` losses: ce, dlr), ``--apgd-steps`` iterations, ``--restarts`` starts;
* the worst case over all of them per image (robust only if no attack's iterate fooled it).

Then adaptive PixelDefend (ε_def ``--adaptive-eps``; threshold at ``--false-alarm`` of clean
validation images): BPDA through it, and the detector-aware attacker (``--penalty`` on relaxed
bits/dim above the threshold's limit), with the share of its images the detector flags. Every
attack's result is cached under ``--work-dir`` (so a run resumes attack by attack); the curves are
drawn to ``--figures-dir`` and the section ``--section`` of BENCHMARKS.md is rewritten, unless
--no-write (then only WORK_DIR/report.md and WORK_DIR/figures).
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import pixelchain as pc
from benchmarks.common import Stopwatch, figures_dir, machine, write_section
from pixelchain import adaptive, defend, runtime
from pixelchain.plots import COLOURS

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
PAPER = ("Athalye et al. (2018): BPDA takes PixelDefend to 9% on CIFAR-10 (ε 8/255); Song et al. (2018) report "
         "no adaptive figure for Fashion-MNIST")


SPARSE = 10  # a curve of fewer points is drawn as points: a line would invent the steps between them


def save_curves(curves: dict[str, list[tuple[int, float]]], path: Path, size: tuple[int, int] = (640, 400)) -> Path:
    """Robust accuracy (%) against steps, one line per attack."""
    curves = {k: v for k, v in curves.items() if v}
    width, height = size
    left, right, upper, bottom = 50, 170, 20, 40
    top_step = max(max(s for s, _ in c) for c in curves.values()) or 1
    lo = 100 * min(min(a for _, a in c) for c in curves.values())
    lo = max(0.0, 10 * np.floor(lo / 10 - 0.5))
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()

    def px(step: float, acc: float) -> tuple[float, float]:
        return (left + step / top_step * (width - left - right),
                height - bottom - (100 * acc - lo) / (100 - lo) * (height - upper - bottom))

    draw.line([px(0, lo / 100), px(top_step, lo / 100)], fill="black")
    draw.line([px(0, lo / 100), px(0, 1)], fill="black")
    for t in np.unique(np.linspace(0, top_step, 6).round()):
        x, y = px(t, lo / 100)
        draw.text((x - 8, y + 6), f"{t:.0f}", fill="black", font=font)
    for t in np.linspace(lo, 100, 6):
        x, y = px(0, t / 100)
        draw.text((x - 40, y - 6), f"{t:.0f}%", fill="black", font=font)
    draw.text((left + (width - left - right) // 2 - 20, height - 16), "step", fill="black", font=font)
    for i, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(curve) < SPARSE:  # a few points (an attack cached before it recorded each step): no line between
            for s, a in curve:
                x, y = px(s, a)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            draw.line([px(s, a) for s, a in curve], fill=colour, width=2)
        draw.text((width - right + 10, upper + 16 * i), name, fill=colour, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def worst(robust: list[torch.Tensor]) -> float:
    """Robust accuracy of the worst case per image over the attacks' ``robust`` masks (nan: none)."""
    return torch.stack(robust).all(0).double().mean().item() if robust else float("nan")


def cached_attack(path: Path, run, cached_only: bool = False) -> dict | None:
    """``run()`` (an AttackResult) summarised and saved as path (.json + .npz), or read back; with
    ``cached_only``, None for an attack not run yet."""
    json_path, npz_path = path.parent / f"{path.name}.json", path.parent / f"{path.name}.npz"  # names hold dots
    if json_path.is_file():
        summary = json.loads(json_path.read_text())
        arrays = np.load(npz_path)
        return {**summary, **{k: torch.from_numpy(arrays[k]) for k in arrays.files}}
    if cached_only:
        return None
    with Stopwatch() as t:
        result = run()
    summary = {"accuracy": result.accuracy, "curve": result.curve, "purified": result.purified,
               "seconds": t.seconds}
    arrays = {"robust": result.robust.numpy(), "x_adv": result.x_adv.numpy().astype(np.uint8),
              "last": result.last.numpy().astype(np.uint8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz_path, **arrays)
    json_path.write_text(json.dumps(summary))
    return {**summary, **{k: torch.from_numpy(v) for k, v in arrays.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist_pixelcnn_pp", help="density model: run directory or shipped name")
    parser.add_argument("--classifiers", nargs="+", default=["fmnist_resnet", "fmnist_vgg"])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--n", type=int, default=300, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=int, default=8, help="attack radius, levels (0-255 units)")
    parser.add_argument("--eps-defend", type=int, nargs="*", default=[16, 32],
                        help="PixelDefend eps_def (none: adaptive PixelDefend only)")
    parser.add_argument("--steps", type=int, default=100, help="PGD steps per restart")
    parser.add_argument("--step-size", type=int, default=1, help="PGD step, levels")
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--routes", nargs="*", default=list(adaptive.ROUTES), choices=adaptive.ROUTES)
    parser.add_argument("--surrogate-steps", type=int, help="steps per restart of the surrogate route, whose steps "
                        "cost ~5x the identity's (default: --steps)")
    parser.add_argument("--surrogate-restarts", type=int, help="restarts of the surrogate route (default: --restarts)")
    parser.add_argument("--temperature", type=float, default=adaptive.TEMPERATURE,
                        help="the smooth purifier's softmax temperature")
    parser.add_argument("--apgd", nargs="*", default=["ce", "dlr"], choices=["ce", "dlr"])
    parser.add_argument("--apgd-steps", type=int, help="APGD iterations per restart (default: --steps)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the 10- and 40-step one-start BPDA")
    parser.add_argument("--adaptive-eps", type=int, default=32, help="adaptive PixelDefend's eps_def (0: skip)")
    parser.add_argument("--false-alarm", type=float, default=0.05)
    parser.add_argument("--reference-n", type=int, default=2000)
    parser.add_argument("--threshold-n", type=int, default=1000)
    parser.add_argument("--penalty", type=float, default=10.0, help="detector-aware: weight of bits/dim over the limit")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="detector-aware: share of dimensions moved per step (largest gradient)")
    parser.add_argument("--check-every", type=int, default=5, help="detector-aware: steps between checks")
    parser.add_argument("--batch-size", type=int, default=50, help="images per gradient call and purification batch")
    parser.add_argument("--work-dir", default="runs/adaptive")
    parser.add_argument("--figures-dir", default=str(FIGURES))
    parser.add_argument("--section", default="pixeldefend_adaptive")
    parser.add_argument("--no-write", action="store_true",
                        help="leave BENCHMARKS.md and its figures alone (the figures go to --work-dir)")
    parser.add_argument("--cached-only", action="store_true", help="run no attack: the tables of the attacks "
                        "already cached in --work-dir (one run's grid can be filled in over several calls)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar per attack (steps, or APGD's restarts)")
    args = parser.parse_args()
    device = runtime.pick_device(args.device)
    model = pc.load(args.model, device).eval()
    test = pc.data.load(args.dataset, "test")
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[: args.n].sort().values
    x, y = test.images[index], test.labels[index]
    work = Path(args.work_dir)
    results: dict = {}
    for name in args.classifiers:
        clf = pc.load(name, device).eval()
        defend.check_pair(clf, model)
        tag = f"{Path(name).name}_n{args.n}_seed{args.seed}_eps{args.eps}"
        out = results[name] = {}
        for e in args.eps_defend:
            res = against_pixeldefend(args, clf, model, x, y, e, work / f"{tag}_def{e}", f"{name}, eps_def {e}")
            if not res["rows"]:  # --cached-only, nothing run yet
                continue
            figure = figures_dir(args) / f"{args.section}_{Path(name).name}_def{e}.png"
            res["figure"] = os.path.relpath(save_curves(res.pop("curves"), figure), REPO)
            out[e] = res
        if args.adaptive_eps:
            res = adaptive_pixeldefend(args, clf, model, x, y, work / f"{tag}_adaptive{args.adaptive_eps}")
            if res["rows"]:
                out["adaptive"] = res
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = render(args, results)
    (work / "report.md").write_text(report)
    print(report)
    if not args.no_write:
        write_section(args.section, report)


def against_pixeldefend(args, clf, model, x, y, eps_def: int, prefix: Path, title: str) -> dict:
    """Every attack on classifier(purify(x, eps_def)); the worst case over all of them."""
    defended = adaptive.Defended(partial(defend.purify, model, eps=eps_def, batch_size=args.batch_size,
                                         progress=False), clf)
    common = dict(progress=args.progress, batch_size=args.batch_size)
    attacks = []
    if not args.no_baselines:
        attacks += [
            ("BPDA, 10 steps of 1, no random start", "bpda10", "BPDA-10", lambda: adaptive.pgd(
                clf, defended, x, y, args.eps, steps=10, step_size=1, random_start=False, **common)),
            ("BPDA, 40 steps of 2, random start", "bpda40", "BPDA-40", lambda: adaptive.pgd(
                clf, defended, x, y, args.eps, steps=40, step_size=2,
                generator=torch.Generator().manual_seed(args.seed), **common))]
    for route in args.routes:
        surrogate = route == "surrogate"
        steps = (args.surrogate_steps if surrogate else None) or args.steps
        restarts = (args.surrogate_restarts if surrogate else None) or args.restarts
        attacks.append((f"PGD-{route}, {steps} steps of {args.step_size}, {restarts} random starts",
                        f"pgd_{route}_s{steps}x{args.step_size}_r{restarts}"
                        + (f"_t{args.temperature}" if surrogate else ""),
                        f"PGD-{route}", partial(
                            adaptive.pgd, clf, defended, x, y, args.eps, steps=steps, step_size=args.step_size,
                            restarts=restarts, route=route, model=model, eps_def=eps_def,
                            temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed + 1),
                            **common)))
    apgd_steps = args.apgd_steps or args.steps
    for loss in args.apgd:
        attacks.append((f"APGD-{loss.upper()} (ART, identity), {apgd_steps} iterations, {args.restarts} random starts",
                        f"apgd_{loss}_s{apgd_steps}_r{args.restarts}", f"APGD-{loss.upper()} (calls)", partial(
                            adaptive.apgd, clf, defended, x, y, args.eps, loss=loss, steps=apgd_steps,
                            restarts=args.restarts, seed=args.seed, progress=args.progress)))
    rows, curves, robust = {}, {}, []
    for label, key, curve, fn in attacks:
        print(f"{title}: {label}", flush=True)
        r = cached_attack(Path(f"{prefix}_{key}"), fn, args.cached_only)
        if r is None:
            print("  not run yet: left out", flush=True)
            continue
        r["last_accuracy"] = defend.accuracy(clf, defended(r["last"].long()), y)
        print(f"  robust {100 * r['accuracy']:.1f}% (last iterate {100 * r['last_accuracy']:.1f}%), "
              f"{r['purified']} purified, {r['seconds']:.0f} s", flush=True)
        rows[label] = {f: r[f] for f in ("accuracy", "last_accuracy", "purified", "seconds", "curve")}
        robust.append(r["robust"])
        if curve:
            curves[curve] = r["curve"]
    return {"rows": rows, "curves": curves, "worst": worst(robust),
            "clean": defend.accuracy(clf, defended(x), y)}


def adaptive_pixeldefend(args, clf, model, x, y, prefix: Path) -> dict:
    """BPDA and the detector-aware attack against adaptive PixelDefend; detection rates."""
    valid = pc.data.load(args.dataset, "valid")
    order = torch.randperm(len(valid), generator=torch.Generator().manual_seed(args.seed + 1))
    reference_bpd = defend.bits_per_dim(model, valid.images[order[: args.reference_n]], progress=False)
    held_out = valid.images[order[args.reference_n : args.reference_n + args.threshold_n]]
    threshold = defend.choose_threshold(defend.p_values(defend.bits_per_dim(model, held_out, progress=False),
                                                        reference_bpd), args.false_alarm)
    limit = adaptive.bpd_limit(reference_bpd, threshold)
    defended = adaptive.Defended(lambda v: defend.adaptive_purify(
        model, v, args.adaptive_eps, reference_bpd, threshold, batch_size=args.batch_size, progress=False)[0], clf)

    def flagged(images: torch.Tensor) -> float:
        return (defend.p_values(defend.bits_per_dim(model, images, progress=False), reference_bpd)
                <= threshold).double().mean().item()

    rows, robust = {}, []
    attacks = [
        (f"BPDA, {args.steps} steps of {args.step_size}, {args.restarts} random starts", "bpda",
         lambda: adaptive.pgd(clf, defended, x, y, args.eps, steps=args.steps, step_size=args.step_size,
                              restarts=args.restarts, generator=torch.Generator().manual_seed(args.seed + 1),
                              batch_size=args.batch_size, progress=args.progress)),
        (f"detector-aware PGD (penalty {args.penalty}, {args.fraction:.0%} of pixels a step), {args.steps} steps "
         f"of {args.step_size}, {args.restarts} starts", f"aware_p{args.penalty}_f{args.fraction}",
         lambda: adaptive.detector_aware(
            clf, model, defended, x, y, args.eps, limit, penalty=args.penalty, steps=args.steps,
            step_size=args.step_size, restarts=args.restarts, check_every=args.check_every, fraction=args.fraction,
            batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed + 2),
            progress=args.progress)),
    ]
    for label, key, fn in attacks:
        print(f"adaptive PixelDefend: {label}", flush=True)
        r = cached_attack(Path(f"{prefix}_{key}_s{args.steps}x{args.step_size}_r{args.restarts}"), fn,
                          args.cached_only)
        if r is None:
            print("  not run yet: left out", flush=True)
            continue
        fooled = ~r["robust"]
        robust.append(r["robust"])
        rows[label] = {"accuracy": r["accuracy"], "seconds": r["seconds"], "curve": r["curve"],
                       "flagged_last": flagged(r["last"].long()),
                       "flagged_fooling": flagged(r["x_adv"][fooled].long()) if fooled.any() else float("nan")}
        print(f"  robust {100 * r['accuracy']:.1f}%, flagged: last iterates {100 * rows[label]['flagged_last']:.1f}%",
              flush=True)
    return {"threshold": threshold, "limit": limit, "clean": defend.accuracy(clf, defended(x), y),
            "clean_flagged": flagged(x), "rows": rows, "worst": worst(robust)}


def render(args, results: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Density model `{args.model}`; the first {args.n} of the seeded permutation (seed {args.seed}) of "
             f"the Fashion-MNIST test split; threat model: L∞, ε_attack {args.eps} (0-255 units), white box "
             f"(classifier, density model and purifier known). Robust accuracy is the worst case over every "
             f"iterate of every restart, per image (each iterate purified and classified). Machine: {machine()}.",
             "", f"Context: {PAPER}.", ""]
    for name, out in results.items():
        for e, res in out.items():
            if e == "adaptive":
                continue
            lines += [f"**{name}, PixelDefend ε_def {e}** (clean images purified: {pct(res['clean'])}%)", "",
                      "| attack | robust accuracy % (worst case over iterates and restarts) | last iterate % "
                      "| images purified | seconds |", "|---|---|---|---|---|"]
            for label, r in res["rows"].items():
                lines.append(f"| {label} | {pct(r['accuracy'])} | {pct(r['last_accuracy'])} | {r['purified']} "
                             f"| {r['seconds']:.0f} |")
            lines += [f"| **worst case over all of the above** | **{pct(res['worst'])}** | | | |", "",
                      f"![robust accuracy against steps, {name}, ε_def {e}]({res['figure']})", ""]
        if "adaptive" in out:
            a = out["adaptive"]
            lines += [f"**{name}, adaptive PixelDefend ε_def {args.adaptive_eps}** (purifies images with p ≤ "
                      f"{a['threshold']:.4f}, i.e. above {a['limit']:.3f} bits/dim; clean images: accuracy "
                      f"{pct(a['clean'])}%, flagged {pct(a['clean_flagged'])}%)", "",
                      "| attack | robust accuracy % | last iterates flagged % | fooling images flagged % | seconds |",
                      "|---|---|---|---|---|"]
            for label, r in a["rows"].items():
                lines.append(f"| {label} | {pct(r['accuracy'])} | {pct(r['flagged_last'])} | "
                             f"{pct(r['flagged_fooling'])} | {r['seconds']:.0f} |")
            lines += [f"| **worst case over both** | **{pct(a['worst'])}** | | | |", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
