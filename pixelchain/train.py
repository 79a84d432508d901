"""Training by maximum likelihood, and evaluation.

``fit`` maximises the minibatch mean of log p(x) (a Monte Carlo estimate of E_data log p(x), the
same as minimising KL(p_data || p_model)) with Adam. A :class:`Trainer` does the work in four
parts: setup (checks, run directory, resume), one epoch, evaluate-and-select (validation NLL, best
weights in ``model.safetensors``, early stopping) and checkpoint (``trainer_state.safetensors``:
weights, optimiser, position in the epoch, RNG), written every ``checkpoint_seconds``, at each
epoch end and on Ctrl-C or SIGTERM, so ``resume=True`` continues an interrupted run exactly where
its last checkpoint left it. :class:`TrainOptions` holds every setting; the CLI builds its
``train`` flags from it. Under ``torchrun`` it trains with DistributedDataParallel, each process on
its shard of every epoch.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import runtime
from .checkpoint import load_weights, model_config
from .data import ImageDataset
from .data.transforms import augment
from .run_dir import CONFIG, STATE, WEIGHTS, RunDir
from .runtime import intra_op_threads, threads_for


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, SIGTERM) after checkpointing; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# rule -> (what a value must be, test); an option whose default is None may also be None
_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "count": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "index": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "positive": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
    "nonnegative": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    "flag": ("True or False", lambda v: isinstance(v, bool)),
    "fraction": ("a number strictly between 0 and 1", lambda v: _is_number(v) and 0 < v < 1),
}


def _option(default: Any, rule: str, help: str) -> Any:
    return field(default=default, metadata={"rule": rule, "help": help})


# seconds between two looks at how many cores other processes leave free (runtime.THREADS)
THREADS_RECHECK = 10.0


@dataclass
class TrainOptions:
    """How ``fit`` trains. Each field is a ``pixelchain train`` flag (``batch_size`` -> ``--batch-size``)
    with its ``help``; ``validate`` rejects values that would train wrongly."""

    epochs: int = _option(20, "count", "passes over the training split")
    batch_size: int = _option(64, "count", "images per optimiser step (per process under torchrun)")
    lr: float = _option(1e-3, "positive", "Adam's learning rate")
    lr_decay: float = _option(1.0, "positive", "learning-rate factor per epoch")
    warmup: int = _option(0, "index", "ramp the learning rate up linearly over this many steps whenever Adam's "
                                      "moments start fresh (a new run, or a checkpoint continued without them)")
    weight_decay: float = _option(0.0, "nonnegative", "L2 penalty on weight matrices and kernels (not biases)")
    grad_clip: float | None = _option(None, "positive", "clip the gradient norm to this")
    patience: int | None = _option(None, "count", "stop after this many evaluations without a better valid NLL")
    max_steps: int | None = _option(None, "count", "stop (resumably) once the run has taken this many steps")
    max_time: float | None = _option(None, "positive", "stop (resumably) after this many seconds of this call")
    checkpoint_seconds: float = _option(60.0, "nonnegative", "at most this much training is lost when killed")
    eval_every: int | None = _option(None, "count", "also evaluate every this many steps inside an epoch")
    eval_batch_size: int = _option(256, "count", "images per evaluation batch")
    seed: int = _option(0, "index", "seed of the data order (and of the CLI's initial weights)")
    compile: bool = _option(False, "flag", "train through torch.compile")
    amp: bool = _option(True, "flag", "bfloat16 autocast where the hardware runs it natively (CUDA, CPUs with "
                                      "AVX512-BF16 or AMX); likelihoods are reported in fp32")
    augment: bool = _option(False, "flag", "classifiers: train on random left-right flips and shifts of up to 2 "
                                           "pixels (a density model would learn the augmented images instead)")
    ema: float | None = _option(None, "fraction", "Polyak averaging: keep an exponential moving average of the "
                                                  "weights with this decay per step (e.g. 0.9995), and evaluate, "
                                                  "select and save it instead of the raw weights")

    def validate(self) -> None:
        """ValueError naming the first option that is out of range or of the wrong type."""
        for f in fields(self):
            value = getattr(self, f.name)
            want, ok = _RULES[f.metadata["rule"]]
            if not ((value is None and f.default is None) or ok(value)):
                raise ValueError(f"{f.name} must be {want}{' or None' if f.default is None else ''}, got {value!r}")

    @classmethod
    def recorded(cls, train: dict) -> dict:
        """The options a run recorded in config.json's "train" (batch size per process), less the
        budgets of one call (``max_steps``, ``max_time``): what a resumed run keeps by default."""
        names = {f.name for f in fields(cls)} - {"max_steps", "max_time"}
        options = {k: v for k, v in train.items() if k in names}
        if train and "amp" not in train:  # recorded before bf16 became the default: it trained in fp32
            options["amp"] = False
        if "batch_size" in options:
            options["batch_size"] //= train.get("processes", 1)
        return options


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _labels(model: nn.Module, dataset: ImageDataset, index: torch.Tensor) -> torch.Tensor | None:
    """The labels a model needs (classifiers and class-conditional models), else None."""
    if getattr(model, "kind", "density") == "classifier" or getattr(model, "num_classes", None):
        if dataset.labels is None:
            raise ValueError(f"{model.name} needs labels, and {dataset!r} has none")
        return dataset.labels[index]
    return None


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, batch_size: int = 256, progress: bool = False) -> dict:
    """Mean NLL over ``dataset``: {'nll': nats per image, 'bits_per_dim', 'n'} for density
    models, {'nll': nats per label, 'accuracy', 'n'} for classifiers. Shards under torchrun."""
    if len(dataset) == 0:
        raise ValueError(f"cannot evaluate on {dataset!r}: it holds no images")
    rank, world = _rank_world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    index = torch.arange(len(dataset))[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of NLL, sum of correct
    batches = index.split(batch_size)
    for idx in tqdm(batches, desc="evaluating", disable=not progress or rank != 0, leave=False):
        x = dataset.images[idx].to(device)  # a dynamic set's fixed draw, so evaluation is repeatable
        labels = _labels(model, dataset, idx)
        labels = None if labels is None else labels.to(device)
        total[0] -= model.log_prob(x, labels).double().sum()
        if model.kind == "classifier":
            total[1] += (model.predict(x) == labels).sum()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    n = len(dataset)
    nll = total[0].item() / n
    if model.kind == "classifier":
        return {"nll": nll, "accuracy": total[1].item() / n, "n": n}
    return {"nll": nll, "bits_per_dim": nll / (math.prod(dataset.image_shape) * math.log(2)), "n": n}


# ----------------------------------------------------------------------------- trainer state
def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                average: dict[str, Tensor] | None = None) -> None:
    """Weights, optimiser tensors, RNG and the weights' moving ``average`` (if any) in one
    safetensors file, the rest as JSON metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in (average or {}).items()})
    optim = optimizer.state_dict()
    for index, slots in optim["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    RunDir(path.parent).write_state(tensors, {**asdict(state), "param_groups": optim["param_groups"]})


def _load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                average: dict[str, Tensor] | None = None) -> TrainerState:
    """Restore model, optimiser and RNG from a trainer state; returns the position, and fills
    ``average`` (when given) with the weights' moving average the file holds, if any. ValueError
    names the file when it is damaged or belongs to another model or optimiser."""
    device = next(model.parameters()).device
    tensors, meta = RunDir(path.parent).read_state()
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    if average is not None:
        average.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value.to(device) if value.dim() else value
    try:
        optimizer.load_state_dict({"state": slots, "param_groups": meta.pop("param_groups")})
        torch.set_rng_state(tensors["rng.torch"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} does not match this model's optimiser (or is damaged): {error}") from None
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return TrainerState.from_json(meta)


@dataclass
class TrainerState:
    """Where a run stands: its position, its best validation NLL and whether it is done. Saved as
    the JSON metadata of trainer_state.safetensors (the field names are the file's keys)."""

    step: int = 0
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches of the current epoch already taken
    best_valid: float | None = None  # nats
    bad_evals: int = 0  # evaluations since the best one
    elapsed: float = 0.0  # training seconds over every call
    images: int = 0
    finished: bool = False  # its epochs ran out, or early stopping
    early_stopped: bool = False
    train_nll: float | None = None  # running mean over the epoch's steps
    evaluated_step: int = -1  # the step of the last evaluation the record holds
    warmup_from: int = 0  # the step at which Adam's moments last started fresh
    averaged_steps: int = 0  # steps the weights' moving average has seen (TrainOptions.ema)

    def warmup_factor(self, warmup: int) -> float:
        """The learning rate's factor at the next step: a linear ramp over the ``warmup`` steps after
        the moments started fresh, where their estimates are still noisy."""
        return min(1.0, (self.step - self.warmup_from + 1) / warmup) if warmup else 1.0

    @classmethod
    def from_json(cls, meta: dict) -> TrainerState:
        """The state of a trainer state's metadata; older files lack the later fields."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in meta.items() if k in known})
        if "early_stopped" not in meta:  # did it ever get worse?
            state.early_stopped = state.bad_evals > 0
        if "evaluated_step" not in meta:
            state.evaluated_step = state.step
        return state

    def stop_reason(self, options: TrainOptions, seconds: float, signal: int = 0) -> str | None:
        """Why training should stop now, after ``seconds`` of this call: None to go on, else the
        reason ("signal", "finished", "epochs", "max_steps", "max_time"). The one place that decides."""
        if signal:
            return "signal"
        if self.finished:
            return "finished"
        if self.epoch >= options.epochs:
            return "epochs"
        if options.max_steps is not None and self.step >= options.max_steps:
            return "max_steps"
        if options.max_time is not None and seconds >= options.max_time:
            return "max_time"
        return None


def write_trainer_state(run_dir: str | Path, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                        **position: Any) -> None:
    """Write a trainer state that ``fit(resume=True)`` continues from: ``model``'s weights, fresh
    Adam moments at learning rate ``lr``, and ``position`` (``step``, ``epoch``, ``batch``,
    ``elapsed`` seconds, ``images``, ``best_valid`` nats). For runs whose optimiser state is gone,
    e.g. a shipped checkpoint that kept its weights and record but not its trainer state."""
    unknown = set(position) - {f.name for f in fields(TrainerState)}
    if unknown:
        raise ValueError(f"unknown trainer position fields: {sorted(unknown)}")
    state = TrainerState(**position)
    state.evaluated_step = state.step  # the record ends with that step's evaluation
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _save_state(Path(run_dir) / STATE, model, adam(model, lr, weight_decay), state)


@contextmanager
def _stop_on_signals(flag: dict) -> Iterator[None]:
    """The first Ctrl-C or SIGTERM asks the loop to checkpoint and stop after the current step; a
    second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise Interrupted(signum)
        flag["stop"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def adam(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """The trainer's optimiser: Adam, its L2 penalty ``weight_decay`` on weight matrices and kernels
    only (coupled, as in torch.optim.Adam). Biases and gains stay free: the bias of a pixel that is
    almost always 0 must reach a large negative logit, and decaying it costs nats on every image.
    The fused implementation where the parameters allow it (~10x faster steps on CPU, which
    matters for models with millions of parameters and cheap forward passes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # one group without decay, so trainer states saved before the split still resume
    groups = ([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
               {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
              if weight_decay else [{"params": params, "weight_decay": 0.0}])
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(groups, lr=lr, fused=fused or None)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """One training run: ``run()`` = setup, then epochs of steps with evaluate-and-select and
    checkpoints, until the epochs, the patience or a budget (steps, time, a signal) run out.
    Arguments as :func:`fit`'s."""

    def __init__(self, model: nn.Module, train: ImageDataset, valid: ImageDataset | None, options: TrainOptions,
                 *, run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                 progress: bool = True,
                 info: dict | None = None, monitor: dict[str, ImageDataset] | None = None,
                 penalty: Callable[[nn.Module], Tensor] | None = None) -> None:
        options.validate()
        self.rank, self.world = _rank_world()
        self.main = self.rank == 0
        model_config(model)  # fail now, not after an hour, if it could not be saved
        if len(train) < self.world:
            raise ValueError(f"{len(train)} training images for {self.world} processes")
        if valid is not None and len(valid) == 0:
            raise ValueError(f"the validation set {valid!r} is empty: pass None to train without one")
        if tuple(train.image_shape) != tuple(model.image_shape) or train.num_levels != model.num_levels:
            raise ValueError(
                f"dataset {train.name!r} has images {train.image_shape} with {train.num_levels} levels, the model "
                f"expects {tuple(model.image_shape)} with {model.num_levels}"
            )
        if options.augment and getattr(model, "kind", None) != "classifier":
            raise ValueError("augment applies to classifiers: a density model trained on flipped and shifted "
                             "images models those, not the dataset")
        if resume and run_dir is None:
            raise ValueError("resume=True needs a run_dir")
        if resume and overwrite:
            raise ValueError("pass resume or overwrite, not both")
        self.model, self.train, self.valid, self.options = model, train, valid, options
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        self.resume, self.overwrite, self.progress, self.info = resume, overwrite, progress, info
        self.monitor, self.penalty = monitor, penalty
        self.device = next(model.parameters()).device
        self.optimizer = adam(model, options.lr, options.weight_decay)
        self.state = TrainerState()
        self.best: dict[str, Tensor] | None = None  # in-memory copy of the best weights
        self.average: dict[str, Tensor] | None = None  # the weights' moving average (options.ema)
        self._averaged: tuple[list[Tensor], list[Tensor]] = ([], [])  # its floating tensors, the weights'
        self._copied: list[tuple[Tensor, Tensor]] = []  # its other tensors (counters, indices) and the weights'
        self.flag = {"stop": 0}  # the signal that asked to stop
        self.net: nn.Module = torch.compile(model) if options.compile else model
        if self.world > 1:
            # Gradients are the buckets' views from the start and are zeroed, never freed (train_step),
            # so backward accumulates into them whatever layout the convolutions' gradients come in:
            # no copy into the buckets, and no "grad strides do not match" warning.
            for p in model.parameters():
                p.grad = torch.zeros_like(p) if p.requires_grad else None
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=options.amp and runtime.bf16_supported(self.device))
        # perf_counter() at this call's start, at the run's (less the time of earlier calls), at the last checkpoint
        self.session_start = self.start = self.last_checkpoint = self.threads_checked = 0.0
        self.work = float("inf")  # multiply-adds of one op of a training step (model.op_work)
        self.most_threads = torch.get_num_threads()  # the caller's setting: the most threads training takes

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Resume or start the run directory: trainer state, config.json, metrics."""
        run, opts = self.run_dir, self.options
        if run is None:
            return
        if self.resume:
            if not (run / STATE).is_file():
                raise FileNotFoundError(f"nothing to resume: {run / STATE} does not exist")
            recorded = run.read_config().get("train", {}) if (run / CONFIG).is_file() else {}
            self._check_unchanged(recorded, ["weight_decay"], "its optimiser was built with it")
            saved_average: dict[str, Tensor] = {}
            state = self.state = _load_state(run / STATE, self.model, self.optimizer, saved_average)
            if not self.optimizer.state:  # a checkpoint continued without its moments
                state.warmup_from = state.step
            if state.batch:
                self._check_unchanged(recorded, ["batch_size", "processes", "seed"], f"it stopped inside epoch "
                                      f"{state.epoch + 1}, whose batches depend on it")
            if state.finished and not state.early_stopped and state.epoch < opts.epochs:
                state.finished = False  # it ran out of epochs, and this call gives it more
            if any(recorded.get(k, getattr(opts, k)) != getattr(opts, k) for k in ("lr", "lr_decay")):
                for group in self.optimizer.param_groups:  # honour a new schedule from this epoch on
                    group["lr"] = opts.lr * opts.lr_decay ** state.epoch
            if opts.ema is not None:
                self.start_average(saved_average)
        elif self.main:  # the other processes would see the config it writes next
            run.refuse_existing(self.overwrite)
            run.clear()
        if self.main:
            train_config = {**asdict(opts), "batch_size": opts.batch_size * self.world, "processes": self.world,
                            "penalty": None if self.penalty is None else getattr(self.penalty, "__name__",
                                                                                 repr(self.penalty))}
            run.write_config({**model_config(self.model), **(self.info or {}), "train": train_config})
            if self.resume:
                # Drop evaluations the checkpoint we resume from does not hold (logged after it was
                # written, possibly at its own step): they will be redone.
                run.keep_metrics_until(self.state.evaluated_step)

    def _check_unchanged(self, recorded: dict, keys: list[str], why: str) -> None:
        """Reject a resumed run's option changes it cannot honour (the ones it can, it does)."""
        opts = self.options
        now = {"batch_size": opts.batch_size * self.world, "processes": self.world, "seed": opts.seed,
               "weight_decay": opts.weight_decay}
        for key in keys:
            if key in recorded and recorded[key] != now[key]:
                raise ValueError(f"{self.run_dir.path} ran with {key} {recorded[key]}, not {now[key]}: {why}; "
                                 f"resume with {key} {recorded[key]}")

    # ----------------------------------------------------------------- the weights' moving average
    def start_average(self, saved: dict[str, Tensor] | None = None) -> None:
        """Begin Polyak averaging (``options.ema``): from ``saved`` when a resumed run holds one
        that fits the model, else from the current weights, counting from zero."""
        current = self.model.state_dict()
        if not saved or set(saved) != set(current):
            saved, self.state.averaged_steps = None, 0
        self.average = {k: (saved[k] if saved else v).detach().to(v.device, copy=True) for k, v in current.items()}
        # in-place pairs: (average, weight) for floating tensors, copied as they are otherwise
        floating = [k for k, v in current.items() if v.is_floating_point()]
        self._averaged = ([self.average[k] for k in floating], [current[k] for k in floating])
        self._copied = [(self.average[k], v) for k, v in current.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update_average(self) -> None:
        """One step of the moving average, its decay ramped up as min(ema, (1 + n) / (10 + n)) after
        n steps, so that the first weights, far from where training goes, fade out quickly."""
        n = self.state.averaged_steps
        decay = min(self.options.ema, (1 + n) / (10 + n))
        torch._foreach_lerp_(self._averaged[0], self._averaged[1], 1.0 - decay)
        for average, weight in self._copied:
            average.copy_(weight)
        self.state.averaged_steps = n + 1

    @contextmanager
    def evaluated_weights(self) -> Iterator[None]:
        """The weights evaluation sees: the moving average while averaging (the raw weights are put
        back afterwards), else the model's own."""
        if self.average is None:
            yield
            return
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.average)
        try:
            yield
        finally:
            self.model.load_state_dict(raw)

    # ----------------------------------------------------------------- checkpoint
    def checkpoint(self) -> None:
        if self.main and self.run_dir is not None:
            _save_state(self.run_dir / STATE, self.model, self.optimizer, self.state, self.average)

    # ----------------------------------------------------------------- evaluate and select
    def evaluate_and_select(self, epoch: float) -> None:
        """Validation (best weights, early stopping) and monitored splits; one metrics line."""
        state = self.state
        record = {"step": state.step, "epoch": round(epoch, 4), "train_nll": state.train_nll,
                  "time": round(state.elapsed, 2), "lr": self.optimizer.param_groups[0]["lr"]}
        with self.evaluated_weights():
            self._evaluate_into(record, epoch)
        state.evaluated_step = state.step
        if self.main and self.run_dir is not None:
            self.run_dir.append_metrics(record)

    def _evaluate_into(self, record: dict, epoch: float) -> None:
        """Evaluate the model's weights as they are now into ``record``: validation (keeping the
        best, early stopping) and the monitored splits."""
        state, opts, main = self.state, self.options, self.main
        save = self.valid is None
        if self.valid is not None:
            metrics = evaluate(self.model, self.valid, opts.eval_batch_size)
            record.update({f"valid_{k}": v for k, v in metrics.items() if k != "n"})
            if state.best_valid is None or metrics["nll"] < state.best_valid:
                state.best_valid, state.bad_evals, save = metrics["nll"], 0, True
                self.best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                state.bad_evals += 1
                if opts.patience is not None and state.bad_evals >= opts.patience:
                    state.finished = state.early_stopped = True
            if main and self.progress:
                tqdm.write(f"epoch {epoch:g}: valid NLL {metrics['nll']:.3f} nats"
                           + (f", {metrics['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in metrics else "")
                           + (f", accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else ""))
        if save and main and self.run_dir is not None:
            self.run_dir.write_weights(self.model.state_dict())
        for name, dataset in (self.monitor or {}).items():
            extra = evaluate(self.model, dataset, opts.eval_batch_size)
            record.update({f"{name}_{k}": v for k, v in extra.items() if k != "n"})

    # ----------------------------------------------------------------- one epoch
    def stop_reason(self) -> str | None:
        """Why training should stop now (``TrainerState.stop_reason``), or None."""
        return self.state.stop_reason(self.options, time.perf_counter() - self.session_start, self.flag["stop"])

    def step(self, idx: Tensor, batch: int, epoch: int) -> Tensor:
        """One optimiser step on the images ``idx``; returns the batch's mean NLL (a tensor)."""
        model, opts = self.model, self.options
        gen = None
        if self.train.intensities is not None or opts.augment:  # fresh draws per batch, redrawn alike on resume
            gen = torch.Generator().manual_seed(hash((opts.seed, epoch, batch, self.rank)) % 2**62)
        x = self.train.batch(idx, gen)  # a dynamic binarisation draws first, then the augmentation
        if opts.augment:
            x = augment(x, gen)
        x = x.to(self.device, non_blocking=True)
        labels = _labels(model, self.train, idx)
        labels = None if labels is None else labels.to(self.device)
        with self.autocast:
            out = self.net(x, labels)
        loss = -model.log_likelihood(out.float(), x, labels).mean()
        objective = loss if self.penalty is None else loss + self.penalty(model)
        if not torch.isfinite(objective):
            where = f"{self.run_dir / STATE}" if self.run_dir is not None else "nothing (no run_dir)"
            raise TrainingDiverged(
                f"the loss became {objective.item()} at step {self.state.step + 1} (epoch {epoch + 1}); "
                f"training stopped and the last checkpoint ({where}) is intact. Lower the learning "
                "rate or set grad_clip, then resume."
            )
        self.optimizer.zero_grad(set_to_none=self.world == 1)
        objective.backward()
        if opts.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        factor = self.state.warmup_factor(opts.warmup)
        if factor < 1.0:  # the schedule's rates stay in the groups; only this step is scaled
            rates = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
            self.optimizer.step()
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
        else:
            self.optimizer.step()
        if self.average is not None:
            self.update_average()
        return loss.detach()

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; returns False when it stopped inside the epoch."""
        state, opts, world = self.state, self.options, self.world
        epoch = state.epoch
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(opts.seed * 100003 + epoch))
        order = order[: len(order) - len(order) % world][self.rank :: world]
        batches = order.split(opts.batch_size)
        bar = tqdm(total=len(batches), initial=state.batch, desc=f"epoch {epoch + 1}/{opts.epochs}",
                   disable=not (self.progress and self.main), unit="batch", dynamic_ncols=True)
        for b in range(state.batch, len(batches)):
            loss = self.step(batches[b], b, epoch)
            state.step += 1
            state.batch = b + 1
            state.images += len(batches[b]) * world
            now = time.perf_counter()
            state.elapsed = now - self.start
            stop = self.stop_reason() is not None
            value = loss.item()
            if world > 1:  # the mean loss over every process, and every process stops at the same step
                reduced = torch.tensor([value, float(stop)], dtype=torch.float64, device=self.device)
                dist.all_reduce(reduced)
                value, stop = reduced[0].item() / world, bool(reduced[1].item())
            running = state.train_nll
            running = state.train_nll = value if running is None or b == 0 else 0.98 * running + 0.02 * value
            shown = {"nll": f"{running:.2f}"}
            if self.model.kind == "density":
                shown["bpd"] = f"{running / (self.model.num_dims * math.log(2)):.4f}"
            bar.set_postfix(shown, refresh=False)
            bar.update()
            evaluated = bool(opts.eval_every) and state.step % opts.eval_every == 0 and b + 1 < len(batches)
            if evaluated:
                self.evaluate_and_select(epoch + (b + 1) / len(batches))
                stop = stop or state.finished
            if stop or evaluated or now - self.last_checkpoint >= opts.checkpoint_seconds:
                self.checkpoint()
                self.last_checkpoint = time.perf_counter()
            if stop:
                break
            if now - self.threads_checked >= THREADS_RECHECK:
                # (intra_op_threads restores the caller's setting afterwards)
                torch.set_num_threads(threads_for(self.work, "train", self.most_threads))
                self.threads_checked = now
        bar.close()
        return state.batch >= len(batches)

    # ----------------------------------------------------------------- the run
    def run(self) -> dict:
        """Train; returns the summary (see :func:`fit`)."""
        lock = self.run_dir.lock() if self.run_dir is not None and self.main else nullcontext()
        with lock:
            self.setup()
            return self._loop()

    def _loop(self) -> dict:
        state, opts = self.state, self.options
        self.session_start = time.perf_counter()
        self.start, self.last_checkpoint = self.session_start - state.elapsed, self.session_start
        self.model.train()
        # the cores other processes leave free, for ops large enough to gain from them (runtime.THREADS
        # decides; train_epoch asks again every THREADS_RECHECK seconds)
        self.work = self.model.op_work(opts.batch_size) if hasattr(self.model, "op_work") else float("inf")
        self.most_threads = torch.get_num_threads()
        if opts.ema is not None and self.average is None:  # a new run (setup() started a resumed one's)
            self.start_average()
        with _stop_on_signals(self.flag), intra_op_threads(threads_for(self.work, "train")):
            while self.stop_reason() is None:
                if not self.train_epoch():
                    break
                state.epoch, state.batch = state.epoch + 1, 0
                for group in self.optimizer.param_groups:
                    group["lr"] *= opts.lr_decay
                self.evaluate_and_select(state.epoch)
                state.finished = state.finished or state.epoch >= opts.epochs
                self.checkpoint()
                self.last_checkpoint = time.perf_counter()
        if self.flag["stop"]:
            if self.main:
                tqdm.write(f"interrupted at step {state.step}; checkpoint saved, resume to continue")
            raise Interrupted(self.flag["stop"])
        run = self.run_dir
        if self.best is None and self.valid is not None and run is not None and (run / WEIGHTS).exists():
            self.best = run.read_weights(self.device)  # the best came before the resume
        elif self.best is None and run is not None and self.main and not (run / WEIGHTS).exists():
            # stopped before its first evaluation: what it has
            run.write_weights(self.average if self.average is not None else self.model.state_dict())
        if self.best is None and self.average is not None:  # no validation set: the average is the model
            self.best = self.average
        if self.best is not None:
            load_weights(self.model, self.best, run / WEIGHTS if run is not None else Path(WEIGHTS))
        return {
            "step": state.step,
            "epoch": state.epoch,
            "finished": state.finished,
            "best_valid": state.best_valid,
            "elapsed": state.elapsed,
            "images_per_s": state.images / max(state.elapsed, 1e-9),
        }


def as_image_dataset(images: Any, model: nn.Module, what: str) -> ImageDataset | None:
    """An ImageDataset from what ``fit`` is given: an ImageDataset, an int tensor of levels
    [N, C, H, W], or a torch ``Dataset`` whose items are such images [C, H, W] (or (image,
    label) pairs); ValueError says how to wrap anything else."""
    if images is None or isinstance(images, ImageDataset):
        return images
    labels = None
    if isinstance(images, Dataset) and not isinstance(images, Tensor):
        items = [images[i] for i in range(len(images))]
        if items and isinstance(items[0], (tuple, list)):
            labels = torch.as_tensor([int(y) for _, y in items])
            items = [x for x, _ in items]
        images = torch.stack([torch.as_tensor(x) for x in items]) if items else None
    if not isinstance(images, Tensor) or images.is_floating_point() or images.dim() != 4:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"fit's {what} images: expected an ImageDataset, an integer tensor of levels "
                         f"[N, C, H, W] or a torch Dataset of them, got {got}; wrap them as "
                         f"pc.data.ImageDataset(x.long(), num_levels={getattr(model, 'num_levels', 'K')})")
    return ImageDataset(images.long().cpu(), getattr(model, "num_levels", int(images.max()) + 1), labels)


def fit(
    model: nn.Module,
    train: ImageDataset,
    valid: ImageDataset | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    info: dict | None = None,
    monitor: dict[str, ImageDataset] | None = None,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    options: TrainOptions | None = None,
    **overrides: Any,
) -> dict:
    """Train ``model`` on ``train`` by maximum likelihood; returns the run's summary.

    ``train`` and ``valid``: ImageDatasets, integer tensors of levels [N, C, H, W] or torch
    Datasets of such images (see :func:`as_image_dataset`).

    Args:
        run_dir: where config, weights, trainer state and metrics go (None: nothing written); locked
            while training, so a second run on it fails at once.
        resume: continue the run in ``run_dir`` from its trainer state. A new ``lr``/``lr_decay`` is
            honoured from the current epoch on; ``weight_decay``, and mid-epoch ``batch_size``, the
            number of processes and ``seed``, must stay as the run recorded them.
        overwrite: replace a model or run already in ``run_dir`` (its files are removed); without it
            (or ``resume``) a ``run_dir`` holding one (``pc.save``'s, a run's) is refused.
        progress: progress bars and a line per evaluation.
        info: extra entries for config.json (e.g. the dataset name).
        monitor: more splits evaluated and logged at each evaluation (e.g. {"test": test} for a
            curve of test NLL against time); they never steer model selection.
        penalty: a further term added to the mean training NLL (nats per image), ``penalty(model)``
            -> scalar tensor, e.g. a prior on the weights that ``weight_decay`` cannot express. The
            logged training NLL leaves it out; give it again when resuming.
        options, overrides: a :class:`TrainOptions` and/or its fields as keywords (epochs=...,
            batch_size=..., lr=...), the keywords winning.
    Returns:
        {'step', 'epoch', 'finished', 'best_valid' (nats), 'elapsed' (s), 'images_per_s'
        (training images per second of wall time, evaluations included)}. With a validation
        set the model ends holding the weights of its best evaluation. It trains in ``train()``
        mode and ends in ``eval()`` mode, ready for use (as ``pc.load`` returns one).
    """
    options = TrainOptions(**{**asdict(options or TrainOptions()), **overrides})
    train, valid = as_image_dataset(train, model, "train"), as_image_dataset(valid, model, "valid")
    summary = Trainer(model, train, valid, options, run_dir=run_dir, resume=resume, overwrite=overwrite,
                      progress=progress, info=info, monitor=monitor, penalty=penalty).run()
    model.eval()
    return summary


__all__ = ["Interrupted", "TrainOptions", "Trainer", "TrainerState", "TrainingDiverged", "adam", "evaluate", "fit",
           "write_trainer_state"]
