"""A lent GPU's minutes: every unfinished full-size preset trained side by side on the one GPU, each
continued from where the repository left it, and what it reached packed for the trip back.

    python -m benchmarks.gpu_session carry-data                      # here: the data into .carry/
    python3 -m benchmarks.gpu_session run --smoke --out $OUT          # there (carry .carry): ~1 minute
    python3 -m benchmarks.gpu_session run --minutes 7 --out $OUT      # there: the real run
    python -m benchmarks.gpu_session unpack FILES_AT --runs-dir runs/gpu   # here: run directories
    python -m benchmarks.report --runs-dir runs/gpu                  # keep the records, rebuild the table
    python -m benchmarks.ship --runs-dir runs/gpu PRESET ...          # where a figure improved

``run`` starts one ``benchmarks.train_bmnist`` process per preset (bf16 autocast; with ``--compile``,
torch.compile for the convolutional and attention presets), each from its shipped checkpoint when there is an
unfinished one (``--from-shipped``), from its run directory when an earlier call of this session
left one (``--resume``), else from scratch; presets whose shipped run finished (early stopping) are
skipped. Training stops resumably ``RESERVE`` seconds before the minutes are up (the final test
split and the packing fit in them); a process still running at the end is interrupted (it
checkpoints) and then killed. ``--smoke`` runs the same commands on ``--smoke-images`` images of
each split for ``SMOKE_SECONDS`` of training, in a separate runs directory.

What comes back from the device machine is at most 8 files of 16 MiB: ``records.tar.gz`` (each run's
result.json, metrics.jsonl, config.json and log), ``weights_N.tar`` (config.json and
model.safetensors, up to 15 MiB an archive; larger weights stay there, their records come back) and
``summary.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.common import SHARED_DATA
from benchmarks.train_bmnist import PRESETS
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.run_dir import CONFIG, METRICS, RESULT, STATE, WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
CARRIED_DATA = ROOT / ".carry" / "data"  # .carry/ is ignored by git; name it in the run's carry
# the full-size presets that have not reached their published figure, and their extra arguments
GPU_PRESETS: dict[str, list[str]] = {
    "gated_pixelcnn": [], "row_lstm": [], "diagonal_bilstm": ["--eval-every", "200"],
    "transformer": [], "transformer_64x8": [],
    "pixelcnn_pp": [], "pixelcnn_drop10": [], "pixelcnn_drop30": [], "pixelcnn_drop30_l2": [],
}
COMPILED = {"gated_pixelcnn", "transformer", "transformer_64x8", "pixelcnn_drop10", "pixelcnn_drop30",
            "pixelcnn_drop30_l2"}
RESERVE, SMOKE_SECONDS = 60.0, 20.0
ARCHIVE_BYTES = 15 << 20
RECORD_FILES = (RESULT, METRICS, CONFIG)


def start_option(preset: str, runs: Path) -> list[str] | None:
    """How a preset starts: its run directory, its shipped checkpoint, or nothing (from scratch);
    None when its shipped run has finished."""
    if (runs / preset / STATE).is_file():
        return ["--resume"]
    shipped = PRETRAINED_DIR / f"bmnist_{preset}" / "result.json"
    if shipped.is_file():
        return None if json.loads(shipped.read_text())["finished"] else ["--from-shipped"]
    return []


def launch(presets: list[str], runs: Path, device: str, seconds: float, compile: bool, limit: int | None) -> dict:
    """One training process per preset, side by side; returns preset -> (process, log path)."""
    runs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, len(presets)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    processes = {}
    for preset in presets:
        option = start_option(preset, runs)
        if option is None:
            print(f"{preset}: its shipped run finished; skipped")
            continue
        command = [sys.executable, "-m", "benchmarks.train_bmnist", preset, "--runs-dir", str(runs), "--device",
                   device, "--max-time", str(seconds), "--no-figures", *option, *GPU_PRESETS.get(preset, [])]
        command += ["--amp"] if device.startswith("cuda") else ["--no-amp"]
        command += ["--compile"] if compile and preset in COMPILED else []
        command += ["--limit", str(limit)] if limit else []
        log = runs / f"{preset}.log"
        print(" ".join(command[1:]), flush=True)
        processes[preset] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"),
                                              stderr=subprocess.STDOUT), log)
    return processes


def wait(processes: dict, deadline: float) -> None:
    """Wait for every process until ``deadline`` (time.monotonic()); then interrupt (they
    checkpoint and stop), and kill what still runs 30 s later."""
    for stop in (deadline, deadline + 30):
        for process, _ in processes.values():
            try:
                process.wait(timeout=max(0.0, stop - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT if stop == deadline else signal.SIGKILL)
    for process, _ in processes.values():
        process.wait()


def pack(runs: Path, presets: list[str], out: Path) -> list[str]:
    """records.tar.gz and weights_N.tar under ``out`` (see the module docstring); returns the
    summary lines."""
    out.mkdir(parents=True, exist_ok=True)
    lines, archives, size = [], [], ARCHIVE_BYTES
    with tarfile.open(out / "records.tar.gz", "w:gz") as records:
        for preset in presets:
            run = runs / preset
            for name in RECORD_FILES:
                if (run / name).is_file():
                    records.add(run / name, f"{preset}/{name}")
            if (runs / f"{preset}.log").is_file():
                records.add(runs / f"{preset}.log", f"{preset}/train.log")
            if not (run / "result.json").is_file():
                lines.append(f"{preset}: no result (see its train.log)")
                continue
            r = json.loads((run / "result.json").read_text())
            weights = run / WEIGHTS
            line = (f"{preset}: test NLL {r['test']['nll']:.2f} (best valid {r['best_valid_nll'] or float('nan'):.2f}) "
                    f"after {r['steps'] * r['train']['batch_size'] / r['train_images']:.1f} epochs, "
                    f"{r['train_seconds'] / 60:.1f} min, {r['images_per_s']:.0f} img/s, finished {r['finished']}")
            if weights.stat().st_size + 4096 > ARCHIVE_BYTES:
                line += f"; weights {weights.stat().st_size / 2**20:.0f} MiB stay there"
            else:
                if size + weights.stat().st_size > ARCHIVE_BYTES:
                    archives.append(tarfile.open(out / f"weights_{len(archives) + 1}.tar", "w"))
                    size = 0
                for name in (CONFIG, WEIGHTS):
                    archives[-1].add(run / name, f"{preset}/{name}")
                size += weights.stat().st_size + 4096
            lines.append(line)
    for archive in archives:
        archive.close()
    if len(archives) > 6:
        lines.append(f"{len(archives)} weight archives: only 8 files come back; ship fewer runs at a time")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return lines


def run(args: argparse.Namespace) -> None:
    if "PIXELCHAIN_DATA" not in os.environ and CARRIED_DATA.is_dir():
        os.environ["PIXELCHAIN_DATA"] = str(CARRIED_DATA)
    os.environ.setdefault("PIXELCHAIN_OFFLINE", "1")
    presets = args.presets or list(GPU_PRESETS)
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise SystemExit(f"unknown presets: {unknown}")
    start = time.monotonic()
    total = SMOKE_SECONDS + RESERVE if args.smoke else args.minutes * 60
    runs = Path(args.runs_dir) / ("smoke" if args.smoke else "real")
    if args.smoke:
        shutil.rmtree(runs, ignore_errors=True)
    limit = args.smoke_images if args.smoke else None
    processes = launch(presets, runs, args.device, total - RESERVE, args.compile, limit)
    wait(processes, start + total)
    lines = pack(runs, list(processes), Path(args.out))
    print("\n".join(lines))
    for preset, (process, log) in processes.items():
        if process.returncode:
            print(f"--- {preset} exited with {process.returncode}; the end of its log:")
            print("\n".join(log.read_text().splitlines()[-15:]))


def carry_data(args: argparse.Namespace) -> None:
    source = Path(os.environ.get("PIXELCHAIN_DATA", SHARED_DATA)) / "binarized_mnist"
    shutil.copytree(source, CARRIED_DATA / "binarized_mnist", dirs_exist_ok=True)
    print(f"{source} -> {CARRIED_DATA / 'binarized_mnist'}; name .carry in the run's carry")


def unpack(args: argparse.Namespace) -> None:
    runs = Path(args.runs_dir)
    for archive in sorted(Path(args.files).glob("*.tar*")):
        with tarfile.open(archive) as tar:
            tar.extractall(runs, filter="data")
    print((Path(args.files) / "summary.txt").read_text(), end="")
    print(f"run directories under {runs}: python -m benchmarks.report --runs-dir {runs}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="train the presets side by side (on the device machine)")
    p.add_argument("presets", nargs="*", help=f"default: {' '.join(GPU_PRESETS)}")
    p.add_argument("--minutes", type=float, default=7.0, help="wall time of the whole run, packing included")
    p.add_argument("--smoke", action="store_true", help="a ~1 minute test of the same commands on a few images")
    p.add_argument("--smoke-images", type=int, default=1000, help="images of each split in --smoke")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help=f"torch.compile {', '.join(sorted(COMPILED))}")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "gpu_session"))
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="where the files to bring back go")
    p.set_defaults(handler=run)
    p = commands.add_parser("carry-data", help="copy binarized MNIST into .carry/data (here)")
    p.set_defaults(handler=carry_data)
    p = commands.add_parser("unpack", help="the files that came back -> run directories (here)")
    p.add_argument("files")
    p.add_argument("--runs-dir", default="runs/gpu")
    p.set_defaults(handler=unpack)
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
