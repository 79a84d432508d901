"""The run directory: every file a run writes, in one place, with a lock against two writers.

    config.json                what to build (model, constructor arguments), the dataset, the
                               training options
    model.safetensors          the best weights (SHA-256 of the tensors in the file's metadata)
    trainer_state.safetensors  weights, optimiser, RNG and position: enough to resume
    metrics.jsonl              one JSON line per evaluation
    result.json                the run's summary (:meth:`RunDir.write_result`)
    check.safetensors          shipped checkpoints: the test images their recorded check scored
    samples.png, completions.png

Files are written atomically (a crash or a full disk leaves the previous version intact) and
tensors with a digest that loading verifies, so a damaged file is an error, never silent garbage.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

CONFIG, WEIGHTS, STATE = "config.json", "model.safetensors", "trainer_state.safetensors"
METRICS, RESULT, CHECK = "metrics.jsonl", "result.json", "check.safetensors"
SAMPLES, COMPLETIONS, LOCK = "samples.png", "completions.png", ".lock"
DIGEST = "sha256"


class RunDirLocked(FileExistsError):
    """Another process is writing to the run directory."""


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash or a full disk never leaves half
    a file, and the previous version survives a failed write."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise OSError(error.errno, f"could not write {path} ({error.strerror or error}); {kept}") from None


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (copied to the CPU) atomically, with their digest in the metadata."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {**(metadata or {}), DIGEST: tensor_digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file, verifying its digest when it has one (files written before digests
    were recorded, or by other tools, have none: those must at least hold finite floats); ValueError
    names the file when it is truncated, corrupt or altered."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{path} is truncated, corrupt or not a safetensors file ({error})") from None
    if DIGEST in metadata and tensor_digest(tensors) != metadata[DIGEST]:
        raise ValueError(f"{path} is corrupt: its tensors do not match the SHA-256 recorded when it was saved")
    if DIGEST not in metadata:  # nothing vouches for the bytes: at least no NaN or infinite weights
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{path} has no SHA-256 to verify and holds NaN or infinite values in "
                             f"{', '.join(sorted(bad)[:3])}{' ...' if len(bad) > 3 else ''}: corrupt, or not weights")
    return {k: v.to(device) for k, v in tensors.items()}, metadata


_held: dict[Path, tuple[int, int]] = {}  # locks this process holds: path -> (fd, depth)


class RunDir:
    """A run directory ``path``; ``pixelchain.checkpoint`` and ``pixelchain.train`` write through it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ----------------------------------------------------------------- lock
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's lock (creating the directory): a second process that tries fails
        at once with :class:`RunDirLocked`. Re-entrant within a process; the operating system
        releases it when the process dies, so a killed run never leaves a stale lock."""
        self.path.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            fd = os.open(self / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirLocked(f"{self.path} is in use by another process (pid {holder}); wait for it "
                                   "to finish or stop it, or choose another run directory") from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            _held[key] = (fd, 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                os.close(fd)  # releases the lock

    # ----------------------------------------------------------------- a new run over an old one
    def held(self) -> list[str]:
        """The files of a model or run already here (config, weights, trainer state)."""
        return [name for name in (CONFIG, WEIGHTS, STATE) if (self / name).exists()]

    def refuse_existing(self, overwrite: bool = False) -> None:
        """Raise FileExistsError if the directory holds a model or run (``pc.save``'s, a run's, a
        copy of a shipped checkpoint), unless ``overwrite``: a new run never replaces one silently."""
        held = self.held()
        if held and not overwrite:
            raise FileExistsError(f"{self.path} already holds a model ({', '.join(held)}): resume it (--resume), "
                                  "replace it (--overwrite), or choose another run directory")

    def clear(self) -> None:
        """Remove every file a run writes here (what ``overwrite`` replaces); other files stay."""
        for name in (CONFIG, WEIGHTS, STATE, METRICS, RESULT, CHECK, SAMPLES, COMPLETIONS):
            (self / name).unlink(missing_ok=True)

    # ----------------------------------------------------------------- config
    def write_config(self, config: dict) -> None:
        """config.json (creating the directory)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))

    def read_config(self) -> dict:
        """config.json, checked for the keys and types every config has."""
        path = self / CONFIG
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is corrupt or not a pixelchain config ({type(error).__name__}: "
                             f"{str(error)[:80]})") from None
        args = config.get("args") if isinstance(config, dict) else None
        problem = (
            "it is not a JSON object" if not isinstance(config, dict)
            else "'model' is missing or not a string" if not isinstance(config.get("model"), str)
            else "'args' is missing or not an object" if not isinstance(args, dict)
            else "'args.image_shape' is not three positive integers" if not _shape(args.get("image_shape"))
            else "'args.num_levels' is not an integer" if not _integer(args.get("num_levels"))
            else None
        )
        if problem:
            raise ValueError(f"{path} is corrupt or not a pixelchain config: {problem}")
        return config

    # ----------------------------------------------------------------- weights
    def write_weights(self, state_dict: dict[str, Tensor]) -> None:
        save_tensors(self / WEIGHTS, state_dict)

    def read_weights(self, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        if not (self / WEIGHTS).is_file():
            raise FileNotFoundError(f"{self / WEIGHTS} is missing: the run has no saved weights yet")
        return load_tensors(self / WEIGHTS, device)[0]

    # ----------------------------------------------------------------- trainer state
    def write_state(self, tensors: dict[str, Tensor], position: dict) -> None:
        """The trainer state: ``tensors`` (model.*, optim.*, rng.*) and the position as JSON."""
        save_tensors(self / STATE, tensors, {"state": json.dumps(position)})

    def read_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, metadata = load_tensors(self / STATE)
        try:
            position = json.loads(metadata["state"])
            position["step"], position["param_groups"]  # noqa: B018 - the keys every state has
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{self / STATE} is not a pixelchain trainer state (no {error})") from None
        return tensors, position

    # ----------------------------------------------------------------- metrics
    def append_metrics(self, record: dict) -> None:
        with open(self / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        """The evaluations logged so far; ValueError names the file and line of a damaged one."""
        path = self / METRICS
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
                record["step"]  # noqa: B018
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}, line {number}: not an evaluation record ({line[:60]!r}); "
                                 "remove or repair that line") from None
            records.append(record)
        return records

    def keep_metrics_until(self, step: int) -> None:
        """Drop the evaluations logged after ``step`` (a checkpoint we resume from does not hold them)."""
        records = self.read_metrics()
        kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step)
        atomic_write(self / METRICS, lambda tmp: tmp.write_text(kept))

    # ----------------------------------------------------------------- result, figures
    def write_result(self, result: dict) -> None:
        """result.json (built by :func:`result_record`)."""
        atomic_write(self / RESULT, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))

    def read_result(self) -> dict:
        return json.loads((self / RESULT).read_text())

    @property
    def samples(self) -> Path:
        return self / SAMPLES

    @property
    def completions(self) -> Path:
        return self / COMPLETIONS

    # ----------------------------------------------------------------- check images
    def write_check(self, images: Tensor, labels: Tensor | None = None) -> None:
        """The images (and labels) a shipped checkpoint's recorded check scores, as uint8."""
        tensors = {"images": images.to(torch.uint8)}
        if labels is not None:
            tensors["labels"] = labels.to(torch.int64)
        save_tensors(self / CHECK, tensors)

    def read_check(self) -> tuple[Tensor, Tensor | None]:
        tensors, _ = load_tensors(self / CHECK)
        return tensors["images"].long(), tensors.get("labels")


def result_record(model: torch.nn.Module, summary: dict, test: dict, **extra: Any) -> dict:
    """result.json's one schema: the model, its size, ``test`` (``pc.evaluate``'s metrics on the
    test split), the training summary (``fit``'s return) and ``extra`` entries (the dataset, a
    benchmark's preset, the device, ...)."""
    return {"model": model.name, "parameters": sum(p.numel() for p in model.parameters()), "test": test,
            "best_valid_nll": summary["best_valid"], "epochs": summary["epoch"], "steps": summary["step"],
            "train_seconds": summary["elapsed"], "images_per_s": summary["images_per_s"],
            "finished": summary["finished"], **extra}


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_integer(v) and v > 0 for v in value)
