"""PixelDefend on Fashion-MNIST against non-adaptive attacks: detection and purification.

    python -m benchmarks.pixeldefend --model fmnist_pixelcnn_pp \
        --classifiers fmnist_resnet fmnist_vgg --n 1000 --work-dir runs/pixeldefend

On ``--n`` test images drawn with ``--seed``: each classifier's clean accuracy; each attack (ART:
random noise, FGSM, BIM, PGD, DeepFool, Carlini-Wagner L-inf) at ``--eps-attack`` (0-255 units) and at
the ``--sweep`` values (for ``--sweep-attacks``); accuracy with no defence, PixelDefend at each
``--eps-defend`` and adaptive PixelDefend (``--adaptive-eps``; images whose p-value is above a
threshold chosen on clean validation images at ``--false-alarm`` stay unchanged); the AUROC of
clean vs attacked bits/dim and their histograms; the
purification throughput, cached vs naive decoding. p-values rank against ``--reference-n``
validation images; the adaptive threshold is chosen on ``--threshold-n`` other validation images.

Everything expensive is cached under ``--work-dir`` (attacked images per classifier, attack and
eps, in chunks of ``--chunk`` images; purified images and bits/dim by the content of the images and
the weights' digest), so an interrupted run resumes where it stopped. ART's C&W
L-inf optimises one image at a time (about 5 s per image on one loaded CPU thread here; DeepFool
about 1 s): ``--attacks`` leaves attacks out, and a second run with ``--section`` can give them
fewer images. Writes the ``--section`` section of BENCHMARKS.md and the histograms to
``--figures-dir`` (``--no-write``: only WORK_DIR/report.md and WORK_DIR/figures). The attacks that know the defence
(BPDA, APGD through the purifier, a detector-aware attacker) are benchmarks/adaptive.py's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

import pixelchain as pc
from benchmarks.common import Stopwatch, figures_dir, machine, write_section
from benchmarks.decoding import naive_seconds
from pixelchain import attacks, checkpoint, defend, plots, runtime

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
PAPER = ("Song et al. (2018), Fashion-MNIST, ResNet, eps_attack 8: accuracy under the strongest non-adaptive "
         "attack 63% without defence, 84% with PixelDefend (the issue's summary of the paper)")


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def images_digest(x: torch.Tensor) -> str:
    """A cache name's part that changes with the images themselves (not with where they came from)."""
    return digest(x.numpy().astype(np.int64).tobytes(), str(tuple(x.shape)).encode())


def weights_digest(run: str) -> str:
    return digest((checkpoint.resolve(run) / checkpoint.WEIGHTS).read_bytes())


def cached(path: Path, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` saved as ``path`` (.npy), or read from there when a run already made it."""
    if path.is_file():
        return torch.from_numpy(np.load(path))
    value = compute().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, value.numpy())
    os.replace(tmp, path)
    return value


class Bench:
    """The density model, its caches, and the purification / bits/dim of any image set."""

    def __init__(self, args, device: torch.device) -> None:
        self.args = args
        self.model = pc.load(args.model, device).eval()
        if self.model.kind != "density":
            raise SystemExit(f"{args.model} is not a density model")
        self.cache = Path(args.work_dir) / f"density_{weights_digest(args.model)}"
        self.timing_path = self.cache / "timing.json"

    def bpd(self, x: torch.Tensor) -> torch.Tensor:
        return cached(self.cache / "bpd" / f"{images_digest(x)}.npy",
                      lambda: defend.bits_per_dim(self.model, x, self.args.batch_size * 4, progress=False))

    def purify(self, x: torch.Tensor, eps: int) -> torch.Tensor:
        def run() -> torch.Tensor:
            with Stopwatch() as t:
                out = defend.purify(self.model, x, eps, batch_size=self.args.batch_size)
            self.record_timing("cached", len(x), t.seconds)
            return out

        return cached(self.cache / "purified" / f"{images_digest(x)}_eps{eps}.npy", run)

    def record_timing(self, decoder: str, n: int, seconds: float) -> None:
        timing = json.loads(self.timing_path.read_text()) if self.timing_path.is_file() else {}
        timing.setdefault(decoder, []).append({"images": n, "seconds": seconds, "batch_size": self.args.batch_size})
        self.timing_path.parent.mkdir(parents=True, exist_ok=True)
        self.timing_path.write_text(json.dumps(timing, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="density model: run directory or shipped name")
    parser.add_argument("--classifiers", nargs="+", default=["fmnist_resnet", "fmnist_vgg"])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--n", type=int, default=1000, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", nargs="+", default=list(attacks.ATTACKS), choices=attacks.ATTACKS)
    parser.add_argument("--eps-attack", type=int, default=8)
    parser.add_argument("--sweep", type=int, nargs="*", default=[4, 16, 25])
    parser.add_argument("--sweep-attacks", nargs="*", default=["fgsm", "bim"], choices=attacks.ATTACKS)
    parser.add_argument("--eps-defend", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--sweep-eps-defend", type=int, nargs="*", default=[],
                        help="PixelDefend eps for the sweep's rows (default: adaptive only; each costs a purification)")
    parser.add_argument("--adaptive-eps", type=int, help="default: the largest --eps-defend")
    parser.add_argument("--false-alarm", type=float, default=0.05,
                        help="share of clean validation images adaptive PixelDefend may purify")
    parser.add_argument("--reference-n", type=int, default=2000, help="validation images the p-values rank against")
    parser.add_argument("--threshold-n", type=int, default=1000, help="other validation images for the threshold")
    parser.add_argument("--naive-steps", type=int, default=8,
                        help="naive decoding steps timed (at --batch-size) and extrapolated to every dimension")
    parser.add_argument("--batch-size", type=int, default=100, help="images per purification batch")
    parser.add_argument("--chunk", type=int, default=100, help="images per cached piece of an attack")
    parser.add_argument("--work-dir", default="runs/pixeldefend")
    parser.add_argument("--figures-dir", default=str(FIGURES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-write", action="store_true",
                        help="leave BENCHMARKS.md and its figures alone (the figures go to --work-dir)")
    parser.add_argument("--section", default="pixeldefend",
                        help="BENCHMARKS.md section and figure-name prefix (e.g. slow attacks on fewer images)")
    args = parser.parse_args()
    runtime.configure_allocator()
    device = runtime.pick_device(args.device)
    bench = Bench(args, device)
    model = bench.model
    adaptive_eps = args.adaptive_eps or max(args.eps_defend)
    work = Path(args.work_dir)
    figures_dir(args).mkdir(parents=True, exist_ok=True)

    test = pc.data.load(args.dataset, "test")
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[: args.n].sort().values
    x, y = test.images[index], test.labels[index]
    valid = pc.data.load(args.dataset, "valid")
    order = torch.randperm(len(valid), generator=torch.Generator().manual_seed(args.seed + 1))
    reference = valid.images[order[: args.reference_n]]
    held_out = valid.images[order[args.reference_n : args.reference_n + args.threshold_n]]
    print(f"{args.n} {args.dataset} test images; density model {args.model}: {model.name}", flush=True)

    reference_bpd = bench.bpd(reference)
    threshold = defend.choose_threshold(defend.p_values(bench.bpd(held_out), reference_bpd), args.false_alarm)
    clean_bpd = bench.bpd(x)

    def evaluate(clf, images: torch.Tensor, bpd: torch.Tensor, eps_list: list[int],
                 clean_right: dict[int, torch.Tensor] | None = None) -> tuple[dict, dict[int, torch.Tensor]]:
        """Accuracy with no defence, PixelDefend at each eps of ``eps_list`` and adaptive; AUROC of
        bits/dim vs clean; and which images each eps's purification leaves classified right. Given
        the clean images' (``clean_right``): ``lost{eps}``, the share the attack costs there (right
        clean, wrong attacked)."""
        row = {"none": defend.accuracy(clf, images.to(device), y.to(device))}
        purified = {e: bench.purify(images, e) for e in sorted(set(eps_list) | {adaptive_eps})}
        right = {e: defend.correct(clf, purified[e].to(device), y.to(device)) for e in eps_list}
        for e in eps_list:
            row[f"eps{e}"] = right[e].double().mean().item()
            if clean_right is not None:
                row[f"lost{e}"] = (clean_right[e] & ~right[e]).double().mean().item()
        # adaptive PixelDefend: purification is per image, so it is the purified image where p <= threshold
        touched = defend.p_values(bpd, reference_bpd) <= threshold
        adaptive = torch.where(touched.view(-1, 1, 1, 1), purified[adaptive_eps], images)
        row["adaptive"] = defend.accuracy(clf, adaptive.to(device), y.to(device))
        row["purified_share"] = touched.double().mean().item()
        row["bpd"] = bpd.mean().item()
        row["auroc"] = defend.auroc(clean_bpd, bpd)
        return row, right

    results: dict = {"classifiers": {}}
    for name in args.classifiers:
        clf = pc.load(name, device).eval()
        if clf.kind != "classifier":
            raise SystemExit(f"{name} is not a classifier")
        defend.check_pair(clf, model)
        tag = f"{Path(name).name}_{weights_digest(name)}_n{args.n}_seed{args.seed}"
        clean, clean_right = evaluate(clf, x, clean_bpd, args.eps_defend)
        out: dict = {"clean": clean, "attacks": {}}
        histogram = {"clean": clean_bpd}
        settings = [(a, args.eps_attack) for a in args.attacks]
        settings += [(a, e) for a in args.sweep_attacks for e in args.sweep if e != args.eps_attack]
        for attack, eps in settings:
            print(f"{name}: {attack} eps {eps}", flush=True)
            x_adv = torch.cat([  # in chunks, each cached: C&W takes seconds per image
                cached(work / "attacks" / f"{tag}_{attack}_eps{eps}_{i}.npy", partial(
                    attacks.attack, clf, x[i : i + args.chunk], y[i : i + args.chunk], attack, eps,
                    generator=torch.Generator().manual_seed(args.seed + i)))
                for i in range(0, args.n, args.chunk)])
            bpd = bench.bpd(x_adv)
            swept = eps != args.eps_attack
            eps_list = args.sweep_eps_defend if swept else args.eps_defend
            out["attacks"][f"{attack}@{eps}"] = evaluate(clf, x_adv, bpd, eps_list, clean_right)[0]
            if eps == args.eps_attack:
                histogram[attack] = bpd
                if attack == args.attacks[-1]:
                    plots.save_before_after(x_adv[:8], bench.purify(x_adv, adaptive_eps)[:8], model.num_levels,
                                            figures_dir(args) / f"{args.section}_{Path(name).name}_{attack}.png")
        plots.save_histogram(histogram, figures_dir(args) / f"{args.section}_bpd_{Path(name).name}.png")
        results["classifiers"][name] = out

    timing = json.loads(bench.timing_path.read_text()) if bench.timing_path.is_file() else {}
    if "naive" not in timing and args.naive_steps:  # a full forward pass per step, at the same batch size
        bench.record_timing("naive", args.batch_size, naive_seconds(model, args.batch_size, args.naive_steps))
        timing = json.loads(bench.timing_path.read_text())
    results.update({"num_dims": model.num_dims, "threshold": threshold, "timing": timing,
                    "clean_bpd": clean_bpd.mean().item(), "reference_bpd": reference_bpd.mean().item()})
    (work / "results.json").write_text(json.dumps(results, indent=2))
    report = render(args, results, adaptive_eps)
    (work / "report.md").write_text(report)
    print(report)
    if not args.no_write:
        write_section(args.section, report)


def render(args, results: dict, adaptive_eps: int) -> str:
    """The BENCHMARKS.md section: tables of accuracy, AUROC and throughput."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    defs = [f"PixelDefend ε_def {e}" for e in args.eps_defend] + [f"adaptive (ε_def {adaptive_eps})"]
    lines = [
        f"Density model `{args.model}`; {args.n} Fashion-MNIST test images (seed {args.seed}); ε in 0-255 units. "
        f"p-values rank against {args.reference_n} validation images; the adaptive threshold p ≤ "
        f"{results['threshold']:.4f} purifies at most {args.false_alarm:.0%} of {args.threshold_n} other clean "
        f"validation images. Mean bits/dim: clean test {results['clean_bpd']:.3f}, reference "
        f"{results['reference_bpd']:.3f}. Machine: {machine()}.", "",
        f"Paper: {PAPER}.", "",
    ]
    for name, out in results["classifiers"].items():
        lines += [f"**{name}** (accuracy %, ε_attack {args.eps_attack} unless noted; AUROC: clean vs attacked "
                  "bits/dim)", "",
                  "| images | no defence | " + " | ".join(defs) + " | purified by adaptive | mean bits/dim | AUROC |",
                  "|---" * (len(defs) + 5) + "|"]
        for label, row in [("clean", out["clean"]), *out["attacks"].items()]:
            cells = [pct(row["none"])] + [pct(row[f"eps{e}"]) if f"eps{e}" in row else "-" for e in args.eps_defend]
            cells += [pct(row["adaptive"])]
            auroc = "-" if label == "clean" else f"{row['auroc']:.3f}"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {pct(row['purified_share'])} | {row['bpd']:.3f} "
                         f"| {auroc} |")
        lost = [(label, [row[f"lost{e}"] for e in args.eps_defend]) for label, row in out["attacks"].items()
                if all(f"lost{e}" in row for e in args.eps_defend)]
        if lost:  # how much of each attack's error is the attack's, how much the classifier's own on purified images
            each = "; ".join(f"{label} " + " / ".join(map(pct, shares)) for label, shares in lost)
            wrong = " / ".join(pct(1 - out["clean"][f"eps{e}"]) for e in args.eps_defend)
            eps = " / ".join(str(e) for e in args.eps_defend)
            lines += ["", f"Lost to the attack, % of images (the clean image purified is classified right, the "
                      f"attacked one purified is not), ε_def {eps}: {each}. The rest of each attack's error lies "
                      f"among the {wrong}% of clean images the classifier misclassifies once purified."]
        figure = os.path.relpath(figures_dir(args) / f"{args.section}_bpd_{Path(name).name}.png", REPO)
        lines += ["", f"![bits/dim, {name}]({figure})", ""]
    timing = results["timing"]
    rate = {k: sum(t["images"] for t in v) / sum(t["seconds"] for t in v) for k, v in timing.items()}
    if "cached" in rate:
        runs = timing["cached"]
        lines.append(f"Purification throughput, cached decoding: {rate['cached']:.2f} images/s over the "
                     f"{len(runs)} purifications this density model's cache holds ({sum(t['images'] for t in runs)} "
                     f"images in batches of {runs[0]['batch_size']}, some timed while other jobs shared the cores).")
    if "naive" in rate and "cached" in rate:
        lines.append(f"Naive decoding (a full forward pass per step, a few steps timed at batch "
                     f"{timing['naive'][0]['batch_size']} and extrapolated to {results['num_dims']} steps): "
                     f"{rate['naive']:.3f} images/s, {rate['cached'] / rate['naive']:.0f}x slower than cached.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
