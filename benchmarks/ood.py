"""Out-of-distribution detection benchmark: AUROC, AUPR and FPR at 95% TPR of every score.

    python -m benchmarks.ood --cache /tmp/ood_cache            # Fashion-MNIST and binarized MNIST
    python -m benchmarks.ood --cache /tmp/ood_cache --no-write # print only

In-distribution Fashion-MNIST (``fmnist_pixelcnn_pp``, background ``fmnist_background``): the
reference (p-values, statistics) is the valid split's first 2,000 images; the test in-set the test
split's first 1,000; out-sets of 500 images built from the other datasets here. The default score (``combined``)
and its components were chosen on *validation* images only: valid-split images 5,000-6,000 against
out-sets of training-split MNIST and Caltech images, noise of another seed and flipped valid images;
the test out-sets below were not looked at for that choice. The row "Fashion-MNIST train" puts 500
training images against the test in-set: it should stay near 0.5 (no false alarms on new images of the kind).
PixelDefend's adversarial sets are FGSM and BIM (eps 8) on ``fmnist_resnet``. A second
in-distribution, binarized MNIST with its shipped ``bmnist_pixelcnn_pp`` (no background shipped),
shows the scores are not tuned to one dataset. Features (bits maps, codec lengths) are cached.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

import pixelchain as pc
from benchmarks.common import Stopwatch, machine, write_section
from pixelchain import attacks, ood
from pixelchain.defend import auroc

PUBLISHED = ("Published figures for Fashion-MNIST vs MNIST (AUROC): Ren et al. 2019 (PixelCNN++): raw likelihood "
             "0.089, likelihood ratio 0.994; alibi-detect's `od.LLR` example: 0.957 (both as quoted, not re-run here).")
OUT = 500  # images per out-set and per set of binarized MNIST (Fashion-MNIST: in-set 1,000, reference 2,000)


def aupr(inn: torch.Tensor, out: torch.Tensor) -> float:
    """Average precision with the out-set as positives, scores higher = out."""
    s = torch.cat([inn, out]).double()
    y = torch.cat([torch.zeros(len(inn)), torch.ones(len(out))])
    order = torch.argsort(s, descending=True, stable=True)
    y = y[order]
    hits = y.cumsum(0)
    precision = hits / torch.arange(1, len(y) + 1)
    return float((precision * y).sum() / y.sum())


def fpr_at_95(inn: torch.Tensor, out: torch.Tensor) -> float:
    """The share of in-set images flagged at the threshold that flags 95% of the out-set."""
    threshold = torch.quantile(out.double(), 0.05)
    return float((inn.double() >= threshold).double().mean())


def fmnist_sets(seed: int, split: str) -> dict[str, torch.Tensor]:
    """Out-sets and in-sets for Fashion-MNIST: ``split`` "test" (the benchmark) or "validation"."""
    g = torch.Generator().manual_seed(seed)
    mnist, fm_test, fm_valid = (pc.data.load(n, s).images for n, s in
                                (("mnist", "test" if split == "test" else "train"), ("fashion_mnist", "test"),
                                 ("fashion_mnist", "valid")))
    caltech = pc.data.load("caltech101_silhouettes", "test" if split == "test" else "train").images * 255
    if split == "test":
        inn, flip_src = fm_test[:1000], fm_test[1000:2000]
        train = pc.data.load("fashion_mnist", "train").images[:OUT]
        sets = {"in: Fashion-MNIST test": inn, "Fashion-MNIST train": train}
    else:
        inn, flip_src = fm_valid[5000:6000], fm_valid[6000:7000]
        sets = {"in: Fashion-MNIST valid": inn}
    sets["MNIST"] = mnist[:OUT]
    sets["Caltech-101 Silhouettes"] = caltech[:OUT]
    sets["uniform noise"] = torch.randint(0, 256, (1000, 1, 28, 28), generator=g)[:OUT]
    sets["Fashion-MNIST flipped upside down"] = flip_src.flip(2)[:OUT]
    if split == "test":
        sets["Fashion-MNIST inverted (255 - x)"] = 255 - fm_test[2000 : 2000 + OUT]
        sets["constant images"] = torch.randint(0, 256, (OUT, 1, 1, 1), generator=g).expand(OUT, 1, 28, 28).clone()
    return sets


def adversarial_sets(cache: Path) -> dict[str, torch.Tensor]:
    path = cache / "adversarial.pt"
    if path.exists():
        return torch.load(path)
    classifier = pc.load("fmnist_resnet")
    test = pc.data.load("fashion_mnist", "test")
    x, y = test.images[3000:3300], test.labels[3000:3300]
    out = {f"{m.upper()} eps 8 (fmnist_resnet)": attacks.attack(classifier, x, y, m, 8,
                                                                 generator=torch.Generator().manual_seed(0))
           for m in ("fgsm", "bim")}
    out["clean (their sources)"] = x
    torch.save(out, path)
    return out


def cached_features(cache: Path, tag: str, name: str, x: torch.Tensor, model, background, codecs) -> ood.Features:
    """Features of x with both codecs (their lengths in codec_bpd as [N, 2]), cached by tag and set name
    (the background's bits/dim apart, so a new background model reuses the rest)."""
    stem = cache / f"{tag}_{''.join(c if c.isalnum() else '_' for c in name)}"
    path, bg_path, flip_path = stem.with_suffix(".pt"), Path(f"{stem}_background.pt"), Path(f"{stem}_flipped.pt")
    watch = Stopwatch()
    if path.exists():  # a cached larger draw of the same set: its first len(x)
        f = ood.Features(**{k: v[: len(x)] for k, v in torch.load(path).items()})
    else:
        f = ood.features(model, x, batch_size=250)
        f.codec_bpd = torch.stack([ood.codec_bits_per_dim(x, model.num_levels, c) for c in codecs], 1)
        torch.save({"nll_map": f.nll_map, "codec_bpd": f.codec_bpd}, path)
    if background is not None:
        if not bg_path.exists():
            torch.save(ood.nll_map(background, x, 250).double().flatten(1).mean(1), bg_path)
        f.background_bpd = torch.load(bg_path)
    if not flip_path.exists():
        torch.save(ood.nll_map(model, x.flip(2), 250).double().flatten(1).mean(1), flip_path)
    f.flipped_bpd = torch.load(flip_path)
    if watch.seconds > 1:
        print(f"  features of {name} ({len(x)} images) in {watch.seconds:.1f} s", flush=True)
    return f


def with_codec(f: ood.Features, i: int) -> ood.Features:
    return ood.Features(f.nll_map, f.background_bpd, f.codec_bpd[:, i], f.flipped_bpd)


def table(model, background, reference: ood.Features, feats: dict[str, ood.Features], scores: list[str],
          codec_index: int) -> tuple[list[str], dict]:
    """Markdown rows: per set, per score AUROC / AUPR / FPR@95 against the first (in) set."""
    detectors = {s: ood.Detector(model, with_codec(reference, codec_index), s, background=background)
                 for s in scores}
    names = list(feats)
    inn = {s: d.score(with_codec(feats[names[0]], codec_index)) for s, d in detectors.items()}
    header = ["| set | mean bits/dim | " + " | ".join(scores) + " |", "|---|---|" + "---|" * len(scores)]
    rows, numbers = [], {}
    for name in names[1:]:
        f = with_codec(feats[name], codec_index)
        cells = []
        for s, d in detectors.items():
            out = d.score(f)
            a, p, r = auroc(inn[s], out), aupr(inn[s], out), fpr_at_95(inn[s], out)
            numbers[(name, s)] = a
            cells.append(f"{a:.3f} / {p:.3f} / {r:.2f}")
        rows.append(f"| {name} | {float(f.bpd.mean()):.2f} | " + " | ".join(cells) + " |")
    mean_in = f"| {names[0]} | {float(feats[names[0]].bpd.mean()):.2f} |" + " – |" * len(scores)
    return header + [mean_in] + rows, numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/tmp/ood_cache")
    parser.add_argument("--background", default="fmnist_background")
    parser.add_argument("--validation", action="store_true", help="the validation sets only (choosing the default)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = pc.load("fmnist_pixelcnn_pp")
    background = None if args.background == "none" else pc.load(args.background)
    valid = pc.data.load("fashion_mnist", "valid").images
    reference = cached_features(cache, "fm", "reference", valid[:2000], model, background, ood.CODECS)
    scores = [s for s in ood.SCORES if s != "ratio" or background is not None]
    lines = []
    for split in ["validation"] if args.validation else ["validation", "test"]:
        sets = fmnist_sets(1 if split == "test" else 2, split)
        if split == "test":
            adv = adversarial_sets(cache)
        feats = {n: cached_features(cache, f"fm{split}", n, x, model, background, ood.CODECS) for n, x in sets.items()}
        for i, codec in enumerate(ood.CODECS):
            rows, _ = table(model, background, reference, feats, scores, i)
            print(f"\n{split}, complexity codec {codec}: AUROC / AUPR / FPR@95%TPR\n" + "\n".join(rows))
            if split == "test" and codec == "png":
                lines += ["", f"Test sets, Fashion-MNIST in (`fmnist_pixelcnn_pp`, background `{args.background}`), "
                          "complexity by PNG. Each cell: AUROC / AUPR / FPR at 95% TPR, out-set positive; "
                          f"`combined` = Fisher of {' + '.join(ood.COMBINED)}.", ""] + rows + ["", PUBLISHED]
                lines += ["", *batch_test_rows(reference, feats)]
                print(lines[-1])
        if split == "validation":
            choice = choose_combination(model, background, reference, feats)
        if split == "test":
            advf = {n: cached_features(cache, "fm", n, x, model, background, ood.CODECS) for n, x in adv.items()}
            advf = {"clean (their sources)": advf.pop("clean (their sources)"), **advf}
            rows, _ = table(model, background, reference, advf, scores, 0)
            print("\nadversarial (in-set: the attacked images' clean sources)\n" + "\n".join(rows))
            lines += ["", "PixelDefend's adversarial sets: 300 test images attacked, against the same 300 clean.", ""]
            lines += rows
    if not args.validation:
        lines += bmnist(cache)
    if not args.no_write and not args.validation:
        body = "\n".join([__doc__.split("\n\n")[2].replace("\n", " ") + f" ({machine()})", ""] + choice + lines)
        write_section("Out-of-distribution detection", body)


def batch_test_rows(reference: ood.Features, feats: dict[str, ood.Features], size: int = 10) -> list[str]:
    """Nalisnick et al.'s batch typicality test: the share of disjoint batches of ``size`` images of each
    set with p <= 0.05 (bootstrap from the reference's bits/dim)."""
    g = torch.Generator().manual_seed(0)
    cells = []
    for name, f in feats.items():
        batches = f.bpd[: len(f.bpd) // size * size].view(-1, size)
        p = torch.tensor([ood.batch_typicality(b, reference.bpd, 2000, g) for b in batches])
        cells.append(f"{name}: {float((p <= 0.05).double().mean()):.2f}")
    return [f"Batch typicality test (Nalisnick et al.), share of batches of {size} flagged at p <= 0.05: "
            + "; ".join(cells) + "."]


def choose_combination(model, background, reference: ood.Features, feats: dict[str, ood.Features]) -> tuple:
    """Fisher combinations of every subset of the candidate scores on the validation sets, best first by
    the worst out-set's AUROC, then the mean: the first is what ``ood.COMBINED`` should be. Returns
    markdown lines: the leading five."""
    candidates = [c for c in ("typicality", "ratio", "complexity", "orientation", "local")
                  if c != "ratio" or background is not None]
    names = list(feats)
    ranked = []
    for k in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, k):
            det = ood.Detector(model, with_codec(reference, 0), "combined", background=background, combine=subset)
            inn = det.score(with_codec(feats[names[0]], 0))
            a = [auroc(inn, det.score(with_codec(feats[n], 0))) for n in names[1:]]
            ranked.append((min(a), sum(a) / len(a), subset, a))
    ranked.sort(key=lambda r: (-r[0], -r[1]))
    head = ["| combination (validation) | worst | mean | " + " | ".join(names[1:]) + " |",
            "|---|---|---|" + "---|" * (len(names) - 1)]
    rows = [f"| {' + '.join(subset)} | {worst:.3f} | {mean:.3f} | " + " | ".join(f"{v:.3f}" for v in a) + " |"
            for worst, mean, subset, a in ranked[:5]]
    print("\nFisher combinations on the validation sets (AUROC)\n" + "\n".join(head + rows))
    print(f"best on validation: {ranked[0][2]}; ood.COMBINED is {ood.COMBINED}")
    text = ("Choosing the default: Fisher combinations of the scores' p-values on the validation sets, ranked by "
            f"the worst out-set's AUROC (the best five); `ood.COMBINED` = {' + '.join(ood.COMBINED)}.")
    return [text, ""] + head + rows


def bmnist(cache: Path) -> list[str]:
    """Binarized MNIST in, with its shipped PixelCNN++: the scores without a background model."""
    model = pc.load("bmnist_pixelcnn_pp")
    test, valid, train = (pc.data.load("binarized_mnist", s).images for s in ("test", "valid", "train"))
    g = torch.Generator().manual_seed(3)
    # the splits are grouped by digit: random draws, not the first images
    test, valid, train = (x[torch.randperm(len(x), generator=g)] for x in (test, valid, train))
    fm = pc.data.load("fashion_mnist", "test").images
    sets = {"in: binarized MNIST test": test[:OUT],
            "binarized MNIST train": train[:OUT],
            "Fashion-MNIST binarized (> 127)": (fm[:OUT] > 127).long(),
            "Caltech-101 Silhouettes": pc.data.load("caltech101_silhouettes", "test").images[:OUT],
            "Bernoulli(0.5) noise": torch.randint(0, 2, (OUT, 1, 28, 28), generator=g),
            "binarized MNIST flipped upside down": test[OUT : 2 * OUT].flip(2)}
    reference = cached_features(cache, "bm", "reference", valid[:1000], model, None, ood.CODECS)
    feats = {n: cached_features(cache, "bm", n, x, model, None, ood.CODECS) for n, x in sets.items()}
    scores = [s for s in ood.SCORES if s != "ratio"]
    rows, _ = table(model, None, reference, feats, scores, 0)
    print("\nbinarized MNIST (bmnist_pixelcnn_pp), PNG\n" + "\n".join(rows))
    return ["", "Second in-distribution: binarized MNIST, `bmnist_pixelcnn_pp`, no background model (so "
            "`combined` joins typicality, complexity and local).", ""] + rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
