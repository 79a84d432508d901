"""A lent GPU's minutes: every unfinished training run side by side on the one GPU, each continued
from where the repository left it, and what it reached packed for the trip back.

    python -m benchmarks.gpu_session carry-data                      # here: the data into .carry/
    python -m benchmarks.gpu_session trim                            # here: other weights set aside
    python3 -m benchmarks.gpu_session run --smoke --out $OUT          # there (carry .carry): ~2 minutes
    python3 -m benchmarks.gpu_session run --minutes 8 --out $OUT      # there: the real run
    python -m benchmarks.gpu_session unpack FILES_AT --runs-dir runs/gpu   # here: run directories
    python -m benchmarks.gpu_session restore                         # here: the weights put back
    python -m benchmarks.ship --runs-dir runs/gpu/... NAME ...        # where a figure improved

The call sends the working tree, at most 64 MiB: the tracked files (43 MB, mostly shipped weights)
and the carried data (Fashion-MNIST alone is 30 MB) no longer fit together, so ``trim`` moves the
weights no job starts from into ``.aside/`` (ignored by git, so it stays here) and ``restore`` puts
them back. ``JOBS`` lists the runs short of their targets: PixelDefend's density model on Fashion-
MNIST (``pixelchain train``) and the binarized-MNIST presets (``benchmarks.train_bmnist``); a
``Job`` can also train from scratch (``train``: ``pixelchain train`` arguments). ``run`` starts one
process per job (bf16 autocast), each from its run directory when an earlier call left one
(``--resume``), else from its shipped checkpoint when that run is unfinished, else from scratch; a
job whose shipped run finished is skipped. Training stops resumably ``RESERVE`` seconds before the
minutes are up (the final test split and the packing fit in them); a process still running at the
end is interrupted (it checkpoints) and then killed. ``--smoke`` runs the same commands for
``SMOKE_SECONDS`` of training each, in a separate runs directory.

What comes back from the device machine is at most 8 files of 16 MiB, 64 MiB in all:
``records.tar.gz`` (each run's result.json, metrics.jsonl, config.json and log), ``weights_N.tar``
(config.json and model.safetensors, up to 15 MiB an archive, ``WEIGHTS_BYTES`` in all, in the
order of ``JOBS``; weights that do not fit stay there, their records come back) and
``summary.txt``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import SHARED_DATA
from benchmarks.continue_runs import JOBS as CONTINUED
from benchmarks.continue_runs import WARMUP, seed_from_shipped
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.run_dir import CONFIG, METRICS, RESULT, STATE, WEIGHTS, RunDir

ROOT = Path(__file__).resolve().parents[1]
CARRIED_DATA = ROOT / ".carry" / "data"  # .carry/ is ignored by git; name it in the run's carry
CARRIED_SETS = {"binarized_mnist": None, "fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
ASIDE = ROOT / ".aside"  # ignored by git and not carried: the weights trim sets aside
RESERVE, SMOKE_SECONDS = 75.0, 20.0
ARCHIVE_BYTES, WEIGHTS_BYTES = 15 << 20, 56 << 20
RECORD_FILES = (RESULT, METRICS, CONFIG)


@dataclass(frozen=True)
class Job:
    """One training run. ``preset``: a benchmarks.train_bmnist preset (run directory and shipped
    checkpoint bmnist_PRESET); else ``train`` holds ``pixelchain train`` arguments from scratch and
    ``shipped`` names the checkpoint the run continues, if any: a job of benchmarks.continue_runs,
    which seeds the run directory (its record's curve included)."""

    name: str
    preset: str | None = None
    train: tuple[str, ...] = ()
    shipped: str | None = None
    extra: tuple[str, ...] = ()  # arguments every call adds (a preset's --eval-every)


# Left out since the lent H200s of 2026-12-04 settled them (BENCHMARKS.md has their commands): the
# heads (Fashion-MNIST's mixture beat the free softmax on validation; MNIST's mixture diverged), the
# fresh 48-filter PixelCNN++ (continuing the shipped one did better), the classifiers and MNIST's
# PixelCNN++ (at their targets).
JOBS = [  # packing order: what the issues need most first
    Job("fmnist_pixelcnn_pp", shipped="fmnist_pixelcnn_pp", extra=("--ema", "0.9995")),
    Job("transformer", preset="transformer"),
    Job("diagonal_bilstm", preset="diagonal_bilstm", extra=("--eval-every", "200")),
    Job("row_lstm", preset="row_lstm"),
    Job("gated_pixelcnn", preset="gated_pixelcnn"),
    Job("pixelcnn_drop30", preset="pixelcnn_drop30"),
    Job("pixelcnn_pp", preset="pixelcnn_pp"),
]
BY_NAME = {job.name: job for job in JOBS}


def shipped_name(job: Job) -> str | None:
    return f"bmnist_{job.preset}" if job.preset else job.shipped


def start_option(job: Job, runs: Path) -> list[str] | None:
    """How a job starts: its run directory, its shipped checkpoint, or nothing (from scratch); None
    when its shipped run has finished."""
    if (runs / job.name / STATE).is_file():
        return ["--resume"]
    shipped = shipped_name(job)
    source = RunDir(PRETRAINED_DIR / shipped) if shipped else None
    if source is not None and (source / RESULT).is_file():
        return None if source.read_result()["finished"] else ["--from-shipped"]
    return []


def command(job: Job, runs: Path, option: list[str], device: str, seconds: float) -> list[str]:
    """The training process of ``job`` (seeding its run directory from the shipped checkpoint when a
    ``pixelchain train`` job continues one)."""
    common = ["--device", device, "--max-time", str(seconds), "--no-figures", "--warmup", str(WARMUP),
              "--amp" if device.startswith("cuda") else "--no-amp"]
    if job.preset:
        return [sys.executable, "-m", "benchmarks.train_bmnist", job.preset, "--runs-dir", str(runs), *option,
                *common, *job.extra]
    run_dir = runs / job.name
    if option == ["--from-shipped"]:
        seed_from_shipped(next(j for j in CONTINUED if j.name == job.shipped), run_dir)
        option = ["--resume"]
    if option == ["--resume"]:
        model = RunDir(run_dir).read_config()["model"]
        return [sys.executable, "-m", "pixelchain.cli", "train", model, "--resume", "--run-dir", str(run_dir),
                "--quiet", *common, *job.extra]
    return [sys.executable, "-m", "pixelchain.cli", "train", *job.train, "--run-dir", str(run_dir), "--quiet",
            *common, *job.extra]


def launch(jobs: list[Job], runs: Path, device: str, seconds: float) -> dict:
    """One training process per job, side by side; returns name -> (process, log path)."""
    runs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, len(jobs)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    processes = {}
    for job in jobs:
        option = start_option(job, runs)
        if option is None:
            print(f"{job.name}: its shipped run finished; skipped")
            continue
        try:
            argv = command(job, runs, option, device, seconds)
        except Exception as e:  # noqa: BLE001 - one job's failure to start must not stop the others
            print(f"{job.name}: could not start ({type(e).__name__}: {e})")
            continue
        log = runs / f"{job.name}.log"
        print(" ".join(argv[1:]), flush=True)
        processes[job.name] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("w"),
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


def describe(name: str, r: dict) -> str:
    test = ", ".join(f"{k} {v:.4f}" for k, v in r["test"].items() if k != "n" and isinstance(v, float))
    valid = r.get("best_valid_nll")
    return (f"{name}: test {test} (best valid NLL {float('nan') if valid is None else valid:.4f}) after "
            f"{r['epochs']} epochs, {r['steps']} steps, {r['train_seconds'] / 60:.1f} min, "
            f"{r['images_per_s']:.0f} img/s, finished {r['finished']}")


def pack(runs: Path, names: list[str], out: Path) -> list[str]:
    """records.tar.gz and weights_N.tar under ``out`` (see the module docstring); returns the
    summary lines."""
    out.mkdir(parents=True, exist_ok=True)
    lines, archives, size, total = [], [], ARCHIVE_BYTES, 0
    with tarfile.open(out / "records.tar.gz", "w:gz") as records:
        for name in names:
            run = runs / name
            for file in RECORD_FILES:
                if (run / file).is_file():
                    records.add(run / file, f"{name}/{file}")
            if (runs / f"{name}.log").is_file():
                records.add(runs / f"{name}.log", f"{name}/train.log")
            if not (run / RESULT).is_file():
                lines.append(f"{name}: no result (see its train.log)")
                continue
            line, weights = describe(name, RunDir(run).read_result()), run / WEIGHTS
            nbytes = weights.stat().st_size + 4096 if weights.is_file() else 0
            if not nbytes:
                line += "; no weights"
            elif nbytes > ARCHIVE_BYTES or total + nbytes > WEIGHTS_BYTES or (size + nbytes > ARCHIVE_BYTES
                                                                            and len(archives) == 6):
                line += f"; weights {weights.stat().st_size / 2**20:.1f} MiB stay there"
            else:
                if size + nbytes > ARCHIVE_BYTES:
                    archives.append(tarfile.open(out / f"weights_{len(archives) + 1}.tar", "w"))
                    size = 0
                for file in (CONFIG, WEIGHTS):
                    archives[-1].add(run / file, f"{name}/{file}")
                size, total = size + nbytes, total + nbytes
            lines.append(line)
    for archive in archives:
        archive.close()
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return lines


def run(args: argparse.Namespace) -> None:
    if "PIXELCHAIN_DATA" not in os.environ and CARRIED_DATA.is_dir():
        os.environ["PIXELCHAIN_DATA"] = str(CARRIED_DATA)
    os.environ.setdefault("PIXELCHAIN_OFFLINE", "1")
    names = args.jobs or [job.name for job in JOBS]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise SystemExit(f"unknown jobs: {unknown}; choose from {list(BY_NAME)}")
    start = time.monotonic()
    total = SMOKE_SECONDS + RESERVE if args.smoke else args.minutes * 60
    runs = Path(args.runs_dir) / ("smoke" if args.smoke else "real")
    if args.smoke:
        shutil.rmtree(runs, ignore_errors=True)
    processes = launch([BY_NAME[n] for n in names], runs, args.device, total - RESERVE)
    wait(processes, start + total)
    lines = pack(runs, list(processes), Path(args.out))
    print("\n".join(lines))
    for name, (process, log) in processes.items():
        if process.returncode:
            print(f"--- {name} exited with {process.returncode}; the end of its log:")
            print("\n".join(log.read_text().splitlines()[-15:]))


def carry_data(args: argparse.Namespace) -> None:
    for name, fallback in CARRIED_SETS.items():
        source = Path(os.environ.get("PIXELCHAIN_DATA", SHARED_DATA)) / name
        if not source.is_dir() and fallback is not None:
            source = fallback
        shutil.copytree(source, CARRIED_DATA / name, dirs_exist_ok=True)
        print(f"{source} -> {CARRIED_DATA / name}")
    print("name .carry in the run's carry")


def trim(args: argparse.Namespace) -> None:
    """Set aside the shipped weights that no job of ``args.jobs`` (default: all) starts from."""
    needed = {shipped_name(BY_NAME[n]) for n in args.jobs or BY_NAME}
    moved = 0
    for weights in sorted(PRETRAINED_DIR.glob(f"*/{WEIGHTS}")):
        if weights.parent.name not in needed:
            target = ASIDE / weights.parent.name / WEIGHTS
            target.parent.mkdir(parents=True, exist_ok=True)
            moved += weights.stat().st_size
            shutil.move(weights, target)
    print(f"{moved / 1e6:.1f} MB of weights set aside in {ASIDE}; `restore` puts them back")


def restore(args: argparse.Namespace) -> None:
    for weights in sorted(ASIDE.glob(f"*/{WEIGHTS}")):
        shutil.move(weights, PRETRAINED_DIR / weights.parent.name / WEIGHTS)
        print(f"restored {weights.parent.name}")


def unpack(args: argparse.Namespace) -> None:
    runs = Path(args.runs_dir)
    for archive in sorted(Path(args.files).glob("*.tar*")):
        with tarfile.open(archive) as tar:
            tar.extractall(runs, filter="data")
    print((Path(args.files) / "summary.txt").read_text(), end="")
    print(f"run directories under {runs}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="train the jobs side by side (on the device machine)")
    p.add_argument("jobs", nargs="*", help=f"default: {' '.join(BY_NAME)}")
    p.add_argument("--minutes", type=float, default=8.0, help="wall time of the whole run, packing included")
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_SECONDS:.0f} s of training each, apart")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "gpu_session"))
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="where the files to bring back go")
    p.set_defaults(handler=run)
    p = commands.add_parser("carry-data", help="copy the datasets into .carry/data (here)")
    p.set_defaults(handler=carry_data)
    p = commands.add_parser("trim", help="set aside the weights no job starts from (here, before the call)")
    p.add_argument("jobs", nargs="*", help="the jobs the call will run (default: all)")
    p.set_defaults(handler=trim)
    p = commands.add_parser("restore", help="put the weights trim set aside back (here, after the call)")
    p.set_defaults(handler=restore)
    p = commands.add_parser("unpack", help="the files that came back -> run directories (here)")
    p.add_argument("files")
    p.add_argument("--runs-dir", default="runs/gpu")
    p.set_defaults(handler=unpack)
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
