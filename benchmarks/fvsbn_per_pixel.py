"""FVSBN on static binarized MNIST with each conditional's L2 penalty chosen on validation.

    python -m benchmarks.fvsbn_per_pixel train 0 1e-4 1e-3 1e-2      # one process per share of the grid
    python -m benchmarks.fvsbn_per_pixel train 3e-5 3e-4 3e-3
    python -m benchmarks.fvsbn_per_pixel train 3e-5@2 1e-5@1 3e-5@2+3e-4
    python -m benchmarks.fvsbn_per_pixel train 5e-5@4 3e-5@1 5e-5@4+3e-4
    python -m benchmarks.fvsbn_per_pixel assemble                     # -> RUNS_DIR/fvsbn_per_pixel

(the grid behind BENCHMARKS.md's ``fvsbn_per_pixel``)

An FVSBN is D separate logistic regressions: pixel d's parameters (b_d, w_d) enter no other
conditional, so the penalised likelihood is D separate convex problems and each can have its own
penalty. A penalty is an L2 strength, ``LAMBDA`` (all weights alike, the trainer's
``weight_decay``), or ``LAMBDA@S[+TAU]``, a :class:`PixelPrior`: weight w_dj (pixel d reading
pixel j, r pixels apart) has strength LAMBDA * (1 + (r / S)^2), a prior that expects a pixel to
depend mostly on its neighbours, and with TAU > 0 is also pulled towards the mean weight of its
offset d - j. For every penalty in the grid, ``train`` fits the model on the training split (Adam, the
``fvsbn_l2`` preset's schedule, best-validation epoch kept), then refits it on train + valid for
that many epochs. ``assemble`` scores each validated fit pixel by pixel on the validation split,
gives pixel d the penalty with its lowest validation NLL, and takes row d of the refit with that
penalty: the usual protocol (select on valid, refit on both), pixel by pixel. The test split is
scored once, at the end. The result is one FVSBN (``pc.load`` works on the run directory), with a
result.json for ``benchmarks.report``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks import common  # noqa: F401  (local dataset copies)
from benchmarks.train_bmnist import PRESETS
from pixelchain import runtime
from pixelchain.run_dir import METRICS, STATE, RunDir, result_record

RUN = "fvsbn_per_pixel"
_, _, SETTINGS = PRESETS["fvsbn_l2"]  # batch size, learning rate and its decay; the penalty varies


class PixelPrior:
    """A Gaussian prior on an FVSBN's weights, as a penalty in nats per image (like the NLL):
    0.5 * sum over the weights w_dj the mask keeps (pixel d reading pixel j, r_dj pixels apart) of
    strength * (1 + (r_dj / scale)^2) * w_dj^2 + template * (w_dj - m(d - j))^2, where m(o) is
    the mean of the weights at offset o: pixels that read a neighbour at the same offset are
    pulled towards one another (the structure a convolution shares outright)."""

    def __init__(self, strength: float, scale: float, template: float = 0.0) -> None:
        self.strength, self.scale, self.template = strength, scale, template
        self.factor = self.kept = self.offset = self.counts = None

    def setup(self, model: torch.nn.Module) -> None:
        C, H, W = model.image_shape  # raster order: channel fastest, then column, then row
        where = torch.tensor([(h, w) for h in range(H) for w in range(W) for _ in range(C)], device=model.device)
        self.kept = model.linear.mask.bool()
        self.factor = self.strength * (1 + torch.cdist(where.float(), where.float()).pow(2) / self.scale**2)
        self.factor = self.factor[self.kept]
        delta = where.unsqueeze(1) - where.unsqueeze(0) + torch.tensor([H - 1, W - 1], device=model.device)
        self.offset = (delta[..., 0] * (2 * W - 1) + delta[..., 1])[self.kept]
        self.counts = torch.bincount(self.offset, minlength=(2 * H - 1) * (2 * W - 1)).clamp(min=1)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if self.kept is None:
            self.setup(model)
        w = model.linear.weight[self.kept]
        penalty = (self.factor * w.pow(2)).sum()
        if self.template:
            means = torch.zeros(len(self.counts), device=w.device).index_add(0, self.offset, w) / self.counts
            penalty = penalty + self.template * (w - means[self.offset]).pow(2).sum()
        return 0.5 * penalty

    def __repr__(self) -> str:
        return f"PixelPrior({self.strength:g}, {self.scale:g}, template={self.template:g})"


def penalty_settings(penalty: str) -> dict:
    """fit's arguments for ``LAMBDA`` (weight_decay) or ``LAMBDA@S[+TAU]`` (a PixelPrior); ValueError
    for anything else."""
    strength, _, rest = penalty.partition("@")
    scale, _, template = rest.partition("+")
    try:
        numbers = [float(strength), float(scale or "inf"), float(template or 0)]
    except ValueError:
        numbers = [-1.0]
    if not all(x >= 0 for x in numbers) or not math.isfinite(numbers[0] + numbers[2]) or numbers[1] == 0:
        raise ValueError(f"penalty {penalty!r}: expected LAMBDA or LAMBDA@S[+TAU], numbers >= 0 and S > 0")
    if not rest:
        return {"weight_decay": numbers[0]}
    return {"weight_decay": 0.0, "penalty": PixelPrior(*numbers)}


def fits_dir(runs_dir: Path, penalty: str) -> Path:
    return runs_dir / f"{RUN}_fits" / f"wd{penalty}"


def train(runs_dir: Path, penalties: list[str], epochs: int, max_time: float | None) -> None:
    """Validated fit, then refit on train + valid, for each penalty (resumable, skips finished ones)."""
    splits = {s: pc.data.load("binarized_mnist", s) for s in ("train", "valid")}
    for penalty in penalties:
        settings = {**SETTINGS, **penalty_settings(penalty)}
        validated, refit = fits_dir(runs_dir, penalty) / "valid", fits_dir(runs_dir, penalty) / "refit"
        for run_dir, data, valid, n_epochs in ((validated, splits["train"], splits["valid"], epochs),
                                               (refit, splits["train"] + splits["valid"], None, None)):
            if (run_dir / "summary.json").is_file():
                continue
            if n_epochs is None:  # the refit trains for the epochs its validated fit chose
                n_epochs = json.loads((validated / "summary.json").read_text())["best_epoch"]
            torch.manual_seed(0)
            model = pc.create("fvsbn", data.image_shape, data.num_levels)
            summary = pc.fit(model, data, valid, run_dir=run_dir, epochs=n_epochs, max_time=max_time,
                             resume=(run_dir / STATE).is_file(), progress=sys.stdout.isatty(),
                             info={"dataset": {"name": "binarized_mnist"}}, **settings)
            if not summary["finished"]:
                raise SystemExit(f"{run_dir}: stopped at epoch {summary['epoch']} (time budget); run again to resume")
            if valid is not None:  # (fit has written the refit's config and final weights)
                records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
                summary["best_epoch"] = round(min(records, key=lambda r: r["valid_nll"])["epoch"])
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"wd {penalty} {run_dir.name}: {summary}")


@torch.no_grad()
def per_pixel_nll(model: torch.nn.Module, data: pc.data.ImageDataset, batch_size: int = 1000) -> torch.Tensor:
    """Mean -log p(x_d | x_<d) over ``data`` for every pixel, in raster order: [D], nats."""
    total = torch.zeros(model.num_dims, dtype=torch.float64)
    for x in data.images.split(batch_size):
        total -= model.raster(model.log_prob_map(x)).double().sum(0)
    return total / len(data)


def assemble(runs_dir: Path, penalties: list[str]) -> dict:
    """Pick each pixel's penalty on validation (among ``penalties``, else every finished fit), build
    the FVSBN from the refits, score it on test."""
    valid, test = pc.data.load("binarized_mnist", "valid"), pc.data.load("binarized_mnist", "test")
    fits = sorted(p for p in (runs_dir / f"{RUN}_fits").glob("wd*") if (p / "refit" / "summary.json").is_file())
    fits = [p for p in fits if not penalties or p.name[2:] in penalties]
    if not fits or (penalties and len(fits) < len(penalties)):
        raise SystemExit(f"fits missing under {runs_dir / f'{RUN}_fits'}: run `train` for them first")
    penalties = [p.name[2:] for p in fits]
    valid_nll = torch.stack([per_pixel_nll(pc.load(p / "valid"), valid) for p in fits])  # [K, D]
    choice = valid_nll.argmin(0)  # [D]: the penalty of each pixel
    refits = [pc.load(p / "refit") for p in fits]
    model = copy.deepcopy(refits[0])
    with torch.no_grad():
        for k, refit in enumerate(refits):
            rows = choice == k  # FVSBN: one output row per pixel, raster order
            model.linear.weight[rows] = refit.linear.weight[rows]
            model.linear.bias[rows] = refit.linear.bias[rows]
    run_dir = runs_dir / RUN
    pc.save(model, run_dir, dataset={"name": "binarized_mnist"})
    summaries = [json.loads((p / run / "summary.json").read_text()) for p in fits for run in ("valid", "refit")]
    seconds = sum(s["elapsed"] for s in summaries)
    single = {w: pc.evaluate(r, test)["nll"] for w, r in zip(penalties, refits, strict=True)}
    summary = {"best_valid": valid_nll.gather(0, choice.unsqueeze(0)).sum().item(),  # selected on it: optimistic
               "epoch": max(s["epoch"] for s in summaries[1::2]), "step": max(s["step"] for s in summaries[1::2]),
               "elapsed": seconds, "images_per_s": sum(s["images_per_s"] * s["elapsed"] for s in summaries) / seconds,
               "finished": True}
    result = result_record(
        model, summary, pc.evaluate(model, test), preset=RUN, hparams={},
        train={**SETTINGS, "weight_decay": "per pixel, chosen on valid from " + ", ".join(penalties)},
        amp=False, curve_images=None, train_images=60_000, refit_on="train+valid", device="cpu",
        pixels_per_penalty={w: int((choice == k).sum()) for k, w in enumerate(penalties)},
        valid_nll_per_penalty={w: valid_nll[k].sum().item() for k, w in enumerate(penalties)},
        test_nll_per_refit=single)
    RunDir(run_dir).write_result(result)
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("train", "assemble"))
    parser.add_argument("penalties", nargs="*", help="penalties to fit (train) or choose from (assemble; default: "
                        "every finished fit), as written: LAMBDA or LAMBDA@S[+TAU], e.g. 3e-4 3e-5@2 3e-5@2+3e-3")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of each validated fit")
    parser.add_argument("--max-time", type=float, help="seconds per fit in this call (resume after)")
    args = parser.parse_args(argv)
    runtime.configure_allocator()
    if args.stage == "train":
        if not args.penalties:
            parser.error("train needs penalties")
        try:
            for penalty in args.penalties:
                penalty_settings(penalty)
        except ValueError as error:
            parser.error(str(error))
        train(Path(args.runs_dir), args.penalties, args.epochs, args.max_time)
    else:
        assemble(Path(args.runs_dir), args.penalties)


if __name__ == "__main__":
    main()
