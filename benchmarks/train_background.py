"""The background model of the likelihood-ratio score (Ren et al. 2019), trained by the library's trainer.

    python -m benchmarks.train_background --run-dir runs/ood/fmnist_background --max-time 2700
    python -m benchmarks.ship --runs-dir runs/ood --prefix "" fmnist_background

A PixelCNN++ like the shipped ``fmnist_pixelcnn_pp`` (same family and head, so the two likelihoods
share their low-level statistics) but narrower, trained on Fashion-MNIST training images in which a
fraction ``mu`` of the pixels is replaced by uniform noise, drawn afresh each batch, with an L2
penalty: it learns the background (smooth regions, edges, the level histogram) and not the
garments, so log p(x) - log p_background(x) keeps what the background cannot explain. Model
selection uses a fixed perturbed draw of 2,000 validation images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks.common import machine
from pixelchain.ood import PerturbedDataset, perturb
from pixelchain.run_dir import RunDir, result_record

HPARAMS = {"channels": 16, "num_resnet": 1, "num_scales": 3, "num_mixtures": 5, "dropout": 0.0}
DATASET = "fashion_mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/ood/fmnist_background")
    parser.add_argument("--mu", type=float, default=0.15, help="fraction of pixels replaced by noise")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-time", type=float, default=2700.0, help="seconds in this call")
    parser.add_argument("--max-steps", type=int, help="stop once the run has taken this many steps")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    train, valid, test = (pc.data.load(DATASET, s) for s in ("train", "valid", "test"))
    train = PerturbedDataset(train.images, train.num_levels, name=DATASET, split="train", mu=args.mu)
    fixed = torch.Generator().manual_seed(1)
    valid = pc.data.ImageDataset(perturb(valid.images[:2000], args.mu, valid.num_levels, fixed), valid.num_levels,
                                 name=DATASET, split="valid")
    torch.manual_seed(0)
    model = pc.create("pixelcnn_pp", image_shape=train.image_shape, num_levels=train.num_levels, **HPARAMS)
    settings = {"batch_size": 32, "lr": 2e-3, "lr_decay": 0.95, "weight_decay": args.weight_decay}
    summary = pc.fit(model, train, valid, run_dir=args.run_dir, epochs=args.epochs, max_time=args.max_time,
                     max_steps=args.max_steps,
                     resume=args.resume, progress=False, eval_every=600,
                     info={"dataset": {"name": DATASET}, "background": {"mu": args.mu}}, **settings)
    metrics = pc.evaluate(model, test)
    record = result_record(model, summary, metrics, run=Path(args.run_dir).name, dataset=DATASET, hparams=HPARAMS,
                           train={**settings, "mu": args.mu}, machine=machine())
    RunDir(args.run_dir).write_result(record)
    print(json.dumps({k: record[k] for k in ("test", "epochs", "steps")}))


if __name__ == "__main__":
    main()
