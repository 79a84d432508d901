"""BENCHMARKS.md's binarized-MNIST section from the run directories of train_bmnist.py.

    python -m benchmarks.report --runs-dir runs/bench

One row per run (test NLL of the best-validation weights, nats, on the static test split), next to
the published figure; then what remains for every run that has not reached it (its curve's recent
slope, and the epochs and time that slope would need); then, for every run, its curve of validation
and test NLL against training time and epochs.

Run directories stay on the machine that trained them; the report copies each run's result.json
and metrics.jsonl into benchmarks/records/bmnist/PRESET/ (committed) and builds the table from
the records, so a run measured in one session is still reported in the next.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks.common import RECORDS, keep_record, write_section
from pixelchain.run_dir import METRICS, RESULT, RunDir

# Published static-bMNIST test NLLs (nats): Larochelle & Murray 2011 (FVSBN, NADE), Germain et al.
# 2015 (MADE), van den Oord et al. 2016 (PixelCNN, Row LSTM, Diagonal BiLSTM); the 79.17 for a
# Transformer is pytorch-generative's ImageGPT on a *dynamically* binarised test set.
PUBLISHED = {"fvsbn": 97.45, "nade": 88.33, "made": 88.40, "made_8000": 88.40, "made_32_masks": 86.64,
             "pixelcnn": 81.30, "row_lstm": 80.54, "diagonal_bilstm": 79.20, "transformer": 79.17}
# No static-bMNIST figure is published for these; the aim is PixelCNN's.
AIMS = {"gated_pixelcnn": 81.30, "pixelcnn_pp": 81.30}


def epochs_of(r: dict) -> float:
    """Epochs a run trained (a resumed or continued run counts its earlier calls)."""
    return r["steps"] * r["train"]["batch_size"] / r.get("train_images", 50_000)


def remaining(run: Path, r: dict, target: float) -> str:
    """A row of the what-remains table: the slope of the best validation NLL so far over the last
    third of the run's epochs (nats per epoch, at least its last two evaluations), the epochs that
    slope needs to take the test NLL to ``target``, and their time at the run's seconds per epoch.
    A lower bound: these curves flatten. Runs of under two epochs are too early to extrapolate."""
    best, curve = math.inf, []
    for point in RunDir(run).read_metrics():
        if "valid_nll" in point:
            best = min(best, point["valid_nll"])
            curve.append((point["epoch"], best))
    last_epoch, last = curve[-1]
    first_epoch, first = next(c for c in curve[:-1] if c[0] >= 2 / 3 * last_epoch or c is curve[-2])
    slope = (first - last) / (last_epoch - first_epoch)
    per_epoch = r["train_seconds"] / epochs_of(r)
    test = r["test"]["nll"]
    cells = [r["preset"], r["device"], f"{test:.2f}", f"{target:.2f}", f"{test - target:.2f}",
             f"{slope:.2f} (ep {first_epoch:.1f}-{last_epoch:.1f})", f"{per_epoch / 60:.1f} min"]
    if last_epoch < 2:
        cells += [f"too early ({last_epoch:.1f} epochs seen)", "-"]
    elif slope <= 0.01:
        cells += ["flat: not by more epochs of this network", "-"]
    else:
        need = (test - target) / slope * per_epoch
        cells += [f">= {(test - target) / slope:.0f}",
                  f">= {need / 3600:.1f} h" if need >= 3600 else f">= {need / 60:.0f} min"]
    return "| " + " | ".join(cells) + " |"


def curve(run: Path, points: int = 8) -> str:
    records = RunDir(run).read_metrics()
    step = max(1, len(records) // points)
    shown = records[::step] + ([records[-1]] if (len(records) - 1) % step else [])
    cells = [f"{r['time'] / 60:.0f} min: {r.get('valid_nll', float('nan')):.2f} / {r.get('test_nll', float('nan')):.2f}"
             for r in shown]
    return f"- **{run.name}** (epoch: valid / test nats): " + "; ".join(
        f"ep {r['epoch']:g} at {c}" for r, c in zip(shown, cells, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--notes", default=str(Path(__file__).with_name("bmnist_notes.md")),
                        help="markdown file shown under the table (how the runs were made, what they miss)")
    args = parser.parse_args()
    for result in Path(args.runs_dir).glob(f"*/{RESULT}"):
        if "preset" in RunDir(result.parent).read_result():  # a train_bmnist run, not another job beside it
            keep_record(result.parent, "bmnist")
    runs = sorted(p.parent for p in (RECORDS / "bmnist").glob(f"*/{RESULT}"))
    results = {run: RunDir(run).read_result() for run in runs}
    rows = ["| run | model | architecture | parameters | test NLL (nats) | published | epochs | training time "
            "| img/s (evaluations included) | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        arch = ", ".join(f"{k}={v}" for k, v in r["hparams"].items()) or "-"
        published = PUBLISHED.get(r["preset"], PUBLISHED.get(r["model"]))
        mark = "" if published is None else (" ✓" if r["test"]["nll"] <= published else "")
        device = r["device"] + (", bf16 autocast" if r.get("amp") else "")
        epochs = f"{epochs_of(r):.1f}"
        epochs += (f" on {r['refit_on']}" if r.get("refit_on") else "") + ("" if r["finished"] else " (resumable)")
        rows.append(f"| {r['preset']} | {r['model']} | {arch} | {r['parameters']:,} | **{r['test']['nll']:.2f}**{mark} "
                    f"| {'-' if published is None else published} | {epochs} | {r['train_seconds'] / 60:.0f} min "
                    f"| {r['images_per_s']:.0f} | {device} |")
    notes = Path(args.notes).read_text().strip() if args.notes else ""
    body = "\n".join(rows) + "\n\n" + (notes + "\n\n" if notes else "")
    missed = []  # runs whose target no run of their model has reached
    for run, r in results.items():
        target = PUBLISHED.get(r["preset"], PUBLISHED.get(r["model"], AIMS.get(r["model"])))
        reached = target is None or any(o["model"] == r["model"] and o["test"]["nll"] <= target
                                        for o in results.values())
        if not reached and not r.get("refit_on") and (run / METRICS).is_file():
            missed.append(remaining(run, r, target))
    body += ("What remains to each missed figure (aims where none is published: " +
             ", ".join(f"{m} {a}" for m, a in AIMS.items()) + "), at each run's recent validation slope and "
             "measured time per epoch on its device (evaluations included); a lower bound, since these curves "
             "flatten:\n\n| run | device | test NLL | target | gap | valid slope, nats/epoch | time per epoch "
             "| epochs at that slope | time |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(missed) + "\n\n")
    body += "NLL against training time (best-validation weights are what the table reports):\n\n"
    body += "\n".join(curve(run) for run in runs if (run / METRICS).is_file())
    write_section("bmnist", body)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
