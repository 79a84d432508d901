"""A classifier for PixelDefend: the shipped ResNet fine-tuned on purified training images.

    python -m benchmarks.purified_classifier --run fmnist_resnet_pd1 --per-eps 10000 --epochs 10 --lr 3e-4 \
        --work-dir runs/purified --runs-dir runs/classifiers
    python -m benchmarks.purified_classifier --classifier runs/classifiers/fmnist_resnet_pd1 --attack-eps 8 \
        --run fmnist_resnet_pd --per-eps 10000 --epochs 5 --lr 2e-4 --work-dir runs/purified --runs-dir runs/classifiers
    python -m benchmarks.ship --runs-dir runs/classifiers --prefix "" fmnist_resnet_pd

Purification moves every pixel to the density model's most likely value within ε_def, so a
classifier trained on clean images sees purified ones slightly out of its distribution: the shipped
ResNet loses 2-4 points of clean accuracy to purification alone. This run purifies ``--per-eps``
training images at each ε_def (different images per ε, a seeded choice; each chunk of 1,000 cached
in WORK under the digests of its images and of the models' weights, so an interrupted call resumes),
and continues the classifier on the clean training split plus those images (flips and shifts as
before). With ``--attack-eps``, as many further training images per ε_def are first attacked (BIM
against the classifier being continued) and then purified: what the purifier leaves of a
perturbation is what the classifier then meets. Validation is the clean validation split plus 1,000
of its images prepared alike per set, so model selection looks at both. The test split is never
purified or seen here; `benchmarks.pixeldefend --classifiers fmnist_resnet_pd` measures the defence
with it, attacks generated against the classifier it ships.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks.common import keep_record, machine
from benchmarks.pixeldefend import cached, images_digest, weights_digest
from pixelchain import attacks, defend, runtime
from pixelchain.data import ImageDataset
from pixelchain.run_dir import RunDir, result_record

DATASET = "fashion_mnist"
CHUNK = 1000


def purified(model, images: torch.Tensor, tag: str, eps: int, work: Path) -> torch.Tensor:
    """``images`` purified within ``eps``, computed a chunk at a time and cached under ``work``."""
    parts = []
    for i in range(0, len(images), CHUNK):
        x = images[i:i + CHUNK]
        parts.append(cached(work / f"{tag}_eps{eps}_{images_digest(x)}.npy",
                            lambda x=x: defend.purify(model, x, eps, batch_size=100, progress=False)))
        print(f"{tag} ε_def {eps}: {i + len(x)}/{len(images)} purified", flush=True)
    return torch.cat(parts)


def with_purified(split: ImageDataset, index: list[torch.Tensor], images: list[torch.Tensor]) -> ImageDataset:
    """``split`` followed by the purified copies of the examples at each index (same labels)."""
    copies = [ImageDataset(x, split.num_levels, split.labels[i], name=split.name, split=f"{split.split} purified")
              for i, x in zip(index, images, strict=True)]
    return sum(copies, split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", default="fmnist_resnet", help="the classifier to continue")
    parser.add_argument("--model", default="fmnist_pixelcnn_pp", help="the density model that purifies")
    parser.add_argument("--eps-defend", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--per-eps", type=int, default=10_000, help="training images purified at each ε_def")
    parser.add_argument("--attack-eps", type=int, default=0,
                        help="also purify this many images' BIM at this ε against --classifier, per ε_def (0: none)")
    parser.add_argument("--work-dir", default="runs/purified")
    parser.add_argument("--runs-dir", default="runs/classifiers")
    parser.add_argument("--run", default="fmnist_resnet_pd")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-time", type=float, default=3600.0)
    parser.add_argument("--purify-only", action="store_true", help="purify (and cache) the images, train nothing")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    runtime.configure_allocator()
    density = pc.load(args.model).eval()
    work = Path(args.work_dir) / f"{Path(args.model).name}_{weights_digest(args.model)}"
    train, valid, test = (pc.data.load(DATASET, s) for s in ("train", "valid", "test"))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    kinds = ["clean", *([f"bim{args.attack_eps}"] if args.attack_eps else [])]
    sets = [(kind, e) for kind in kinds for e in args.eps_defend]  # each: its own training and validation images
    train_index = [order[k * args.per_eps:(k + 1) * args.per_eps] for k in range(len(sets))]
    valid_index = [torch.arange(k * 1000, (k + 1) * 1000) for k in range(len(sets))]
    classifier = pc.load(args.classifier)  # attacked first (--attack-eps), then continued

    def source(split: ImageDataset, kind: str, eps: int, index: torch.Tensor, tag: str) -> tuple[torch.Tensor, str]:
        """The images to purify at ``eps``: clean, or BIM's against the classifier being continued."""
        if kind == "clean":
            return split.images[index], tag
        tag = f"{tag}_{kind}_{Path(args.classifier).name}_{weights_digest(args.classifier)}"
        return cached(work / f"{tag}_{images_digest(split.images[index])}.npy",
                      lambda: attacks.attack(classifier, split.images[index], split.labels[index], "bim",
                                             args.attack_eps)), tag

    valid_pure = [purified(density, *source(valid, k, e, i, "valid"), e, work)
                  for (k, e), i in zip(sets, valid_index, strict=True)]
    train_pure = [purified(density, *source(train, k, e, i, "train"), e, work)
                  for (k, e), i in zip(sets, train_index, strict=True)]
    if args.purify_only:
        return
    checks = [("clean", valid.images[:2000], valid.labels[:2000]),
              *((f"{k} ε_def {e}", v, valid.labels[i])
                for (k, e), i, v in zip(sets, valid_index, valid_pure, strict=True))]

    def report(name: str, classifier) -> None:
        print(name, "validation accuracy:",
              ", ".join(f"{label} {defend.accuracy(classifier, x, y):.4f}" for label, x, y in checks), flush=True)

    report(args.classifier, classifier)
    settings = {"batch_size": 128, "lr": args.lr, "lr_decay": 0.85, "warmup": 100, "augment": True}
    run_dir = Path(args.runs_dir) / args.run
    summary = pc.fit(classifier, with_purified(train, train_index, train_pure),
                     with_purified(valid, valid_index, valid_pure), run_dir=run_dir, epochs=args.epochs,
                     max_time=args.max_time, resume=args.resume, progress=False,
                     info={"dataset": {"name": DATASET}}, **settings)
    report(args.run, classifier)
    metrics = pc.evaluate(classifier, test)
    hparams = {"continued_from": args.classifier, "purified_by": args.model, "eps_defend": args.eps_defend,
               "purified_per_eps": args.per_eps, "purified_bim_eps": args.attack_eps}
    RunDir(run_dir).write_result(result_record(classifier, summary, metrics, run=args.run, dataset=DATASET,
                                               hparams=hparams, train=settings, machine=machine(),
                                               date=time.strftime("%Y-%m-%d")))
    keep_record(run_dir, "classifiers")
    print(f"{args.run}: clean test accuracy {metrics['accuracy']:.4f}, {summary['epoch']} epochs "
          f"in {summary['elapsed']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
