"""Training by maximum likelihood, and evaluation.

``fit`` maximises the minibatch mean of log p(x) (a Monte Carlo estimate of E_data log p(x), the
same as minimising KL(p_data || p_model)) with Adam. It evaluates on the validation split each
epoch, keeps the best weights (``model.safetensors``), stops early, and checkpoints its whole
state (``trainer_state.safetensors``: weights, optimiser, position in the epoch, RNG) every
``checkpoint_seconds``, at each epoch end and on Ctrl-C, so ``resume=True`` continues an
interrupted run exactly where its last checkpoint left it. Under ``torchrun`` it trains with
DistributedDataParallel, each process on its shard of every epoch.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import CONFIG, WEIGHTS, atomic_write, model_config, save_weights
from .data import ImageDataset

STATE, METRICS = "trainer_state.safetensors", "metrics.jsonl"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


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
    rank, world = _rank_world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    index = torch.arange(len(dataset))[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of NLL, sum of correct
    for idx in tqdm(index.split(batch_size), desc="evaluating", disable=not progress or rank != 0, leave=False):
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
def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Weights, optimiser tensors and RNG in one safetensors file, the rest as JSON metadata."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, slots in optim["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {**state, "param_groups": optim["param_groups"]}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)}))


def _load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    device = next(model.parameters()).device
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value.to(device) if value.dim() else value
    optimizer.load_state_dict({"state": slots, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def _new_state() -> dict:
    """The trainer's position before its first step (saved as JSON in the trainer state)."""
    return {"step": 0, "epoch": 0, "batch": 0, "best_valid": None, "bad_evals": 0, "elapsed": 0.0,
            "images": 0, "finished": False, "train_nll": None, "evaluated_step": -1}


def write_trainer_state(run_dir: str | Path, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                        **position) -> None:
    """Write a trainer state that ``fit(resume=True)`` continues from: ``model``'s weights, fresh
    Adam moments at learning rate ``lr``, and ``position`` (``step``, ``epoch``, ``batch``,
    ``elapsed`` seconds, ``images``, ``best_valid`` nats). For runs whose optimiser state is gone,
    e.g. a shipped checkpoint that kept its weights and record but not its trainer state."""
    state = _new_state()
    unknown = set(position) - set(state)
    if unknown:
        raise ValueError(f"unknown trainer position fields: {sorted(unknown)}")
    state.update(position)
    state["evaluated_step"] = state["step"]  # the record ends with that step's evaluation
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _save_state(Path(run_dir) / STATE, model, adam(model, lr, weight_decay), state)


@contextmanager
def _stop_on_interrupt(flag: dict):
    """First Ctrl-C asks the loop to checkpoint and stop after the current step; a second one
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- fit
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


def fit(
    model: nn.Module,
    train: ImageDataset,
    valid: ImageDataset | None = None,
    *,
    run_dir: str | Path | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    lr_decay: float = 1.0,
    weight_decay: float = 0.0,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    grad_clip: float | None = None,
    patience: int | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    checkpoint_seconds: float = 60.0,
    eval_every: int | None = None,
    eval_batch_size: int = 256,
    seed: int = 0,
    compile: bool = False,
    amp: bool = False,
    resume: bool = False,
    progress: bool = True,
    info: dict | None = None,
    monitor: dict[str, ImageDataset] | None = None,
) -> dict:
    """Train ``model`` on ``train`` by maximum likelihood; returns the run's summary.

    Args:
        run_dir: where config, weights, trainer state and metrics go (None: nothing written).
        epochs: passes over ``train``; ``lr_decay`` multiplies the learning rate after each.
        weight_decay: L2 penalty on weight matrices and kernels (not biases), Adam's coupled form.
        penalty: a further term added to the mean training NLL (nats per image), ``penalty(model)``
            -> scalar tensor, e.g. a prior on the weights that ``weight_decay`` cannot express. The
            logged training NLL leaves it out; give it again when resuming.
        patience: stop after this many evaluations without a better validation NLL.
        max_steps: stop (resumably) once the run has taken this many optimiser steps in all.
        max_time: stop (resumably) after this many seconds of this call (resumed runs get more).
        checkpoint_seconds: at most this much training is lost when the process is killed.
        eval_every: also evaluate every this many optimiser steps inside an epoch (slow models'
            curves and early stopping need not wait for an epoch's end).
        compile: train through ``torch.compile``; ``amp``: bfloat16 autocast on CUDA.
        resume: continue the run in ``run_dir`` from its trainer state.
        info: extra entries for config.json (e.g. the dataset name).
        monitor: more splits evaluated and logged after each epoch (e.g. {"test": test} for a
            curve of test NLL against time); they never steer model selection.
    Returns:
        {'step', 'epoch', 'finished', 'best_valid' (nats), 'elapsed' (s), 'images_per_s'
        (training images per second of wall time, evaluations included)}. With a validation
        set the model ends holding the weights of its best evaluation.
    """
    rank, world = _rank_world()
    main = rank == 0
    device = next(model.parameters()).device
    run_dir = Path(run_dir) if run_dir is not None else None
    model_config(model)  # fail now, not after an hour, if it could not be saved
    if batch_size < 1 or epochs < 1:
        raise ValueError("batch_size and epochs must be >= 1")
    if len(train) < world:
        raise ValueError(f"{len(train)} training images for {world} processes")
    if tuple(train.image_shape) != tuple(model.image_shape) or train.num_levels != model.num_levels:
        raise ValueError(
            f"dataset {train.name!r} has images {train.image_shape} with {train.num_levels} levels, the model "
            f"expects {tuple(model.image_shape)} with {model.num_levels}"
        )

    optimizer = adam(model, lr, weight_decay)
    state = _new_state()
    if run_dir is not None:
        state_path = run_dir / STATE
        if resume:
            if not state_path.is_file():
                raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
            state = _load_state(state_path, model, optimizer)
        elif state_path.exists():
            raise FileExistsError(f"{run_dir} already holds a run: resume it (resume=True) or choose a new run_dir")
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config = {**model_config(model), **(info or {}), "train": {
                "epochs": epochs, "batch_size": batch_size * world, "lr": lr, "lr_decay": lr_decay,
                "weight_decay": weight_decay, "grad_clip": grad_clip,
                "penalty": None if penalty is None else getattr(penalty, "__name__", repr(penalty)),
                "seed": seed, "processes": world}}
            atomic_write(run_dir / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    elif resume:
        raise ValueError("resume=True needs a run_dir")

    net = torch.compile(model) if compile else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")

    def checkpoint():
        if main and run_dir is not None:
            _save_state(run_dir / STATE, model, optimizer, state)

    def log(record):
        if main and run_dir is not None:
            with open(run_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    if main and run_dir is not None and resume and (run_dir / METRICS).exists():
        # Drop evaluations the checkpoint we resume from does not hold (logged after it was written,
        # possibly at its own step): they will be redone.
        lines = (run_dir / METRICS).read_text().splitlines()
        evaluated = state.get("evaluated_step", state["step"])  # runs from before the field existed
        kept = [line for line in lines if json.loads(line)["step"] <= evaluated]
        (run_dir / METRICS).write_text("".join(line + "\n" for line in kept))

    flag = {"stop": False}
    best = None  # in-memory copy of the best weights

    def evaluate_and_log(epoch: float) -> None:
        """Validation (best weights, early stopping) and monitored splits; one metrics line."""
        nonlocal best
        record = {"step": state["step"], "epoch": round(epoch, 4), "train_nll": state["train_nll"],
                  "time": round(state["elapsed"], 2), "lr": optimizer.param_groups[0]["lr"]}
        if valid is not None:
            metrics = evaluate(model, valid, eval_batch_size)
            record.update({f"valid_{k}": v for k, v in metrics.items() if k != "n"})
            if state["best_valid"] is None or metrics["nll"] < state["best_valid"]:
                state["best_valid"], state["bad_evals"] = metrics["nll"], 0
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if main and run_dir is not None:
                    save_weights(model, run_dir / WEIGHTS)
            else:
                state["bad_evals"] += 1
                if patience is not None and state["bad_evals"] >= patience:
                    state["finished"] = True
            if main and progress:
                tqdm.write(f"epoch {epoch:g}: valid NLL {metrics['nll']:.3f} nats"
                           + (f", {metrics['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in metrics else "")
                           + (f", accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else ""))
        elif main and run_dir is not None:
            save_weights(model, run_dir / WEIGHTS)
        for name, dataset in (monitor or {}).items():
            extra = evaluate(model, dataset, eval_batch_size)
            record.update({f"{name}_{k}": v for k, v in extra.items() if k != "n"})
        state["evaluated_step"] = state["step"]
        log(record)

    session_start = time.perf_counter()

    def should_stop() -> bool:
        return (flag["stop"] or (max_time is not None and time.perf_counter() - session_start >= max_time)
                or (max_steps is not None and state["step"] >= max_steps))
    start, last_checkpoint = time.perf_counter() - state["elapsed"], time.perf_counter()
    model.train()
    with _stop_on_interrupt(flag):
        while state["epoch"] < epochs and not state["finished"]:
            epoch = state["epoch"]
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            order = order[: len(order) - len(order) % world][rank::world]
            batches = order.split(batch_size)
            bar = tqdm(total=len(batches), initial=state["batch"], desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not (progress and main), unit="batch", dynamic_ncols=True)
            for b in range(state["batch"], len(batches)):
                idx = batches[b]
                gen = None
                if train.intensities is not None:  # fresh, reproducible binarisation
                    gen = torch.Generator().manual_seed(hash((seed, epoch, b, rank)) % 2**62)
                x = train.batch(idx, gen).to(device, non_blocking=True)
                labels = _labels(model, train, idx)
                labels = None if labels is None else labels.to(device)
                with autocast:
                    out = net(x, labels)
                loss = -model.log_likelihood(out.float(), x, labels).mean()
                objective = loss if penalty is None else loss + penalty(model)
                if not torch.isfinite(objective):
                    where = f"{run_dir}/{STATE}" if run_dir is not None else "nothing (no run_dir)"
                    raise TrainingDiverged(
                        f"the loss became {objective.item()} at step {state['step'] + 1} (epoch {epoch + 1}); "
                        f"training stopped and the last checkpoint ({where}) is intact. Lower the learning "
                        "rate or set grad_clip, then resume."
                    )
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                state["step"] += 1
                state["batch"] = b + 1
                state["images"] += len(idx) * world
                value, running = loss.item(), state["train_nll"]
                running = state["train_nll"] = value if running is None or b == 0 else 0.98 * running + 0.02 * value
                bar.set_postfix(nll=f"{running:.2f}", bpd=f"{running / (model.num_dims * math.log(2)):.4f}"
                                if model.kind == "density" else None, refresh=False)
                bar.update()
                now = time.perf_counter()
                state["elapsed"] = now - start
                stop = should_stop()
                if world > 1:  # every process stops at the same step
                    stop_t = torch.tensor(float(stop), device=device)
                    dist.all_reduce(stop_t)
                    stop = bool(stop_t.item())
                evaluated = bool(eval_every) and state["step"] % eval_every == 0 and b + 1 < len(batches)
                if evaluated:
                    evaluate_and_log(epoch + (b + 1) / len(batches))
                    stop = stop or state["finished"]
                if stop or evaluated or now - last_checkpoint >= checkpoint_seconds:
                    checkpoint()
                    last_checkpoint = time.perf_counter()
                if stop:
                    break
            bar.close()
            if state["batch"] < len(batches):  # stopped inside the epoch
                break
            state["epoch"], state["batch"] = epoch + 1, 0
            for group in optimizer.param_groups:
                group["lr"] *= lr_decay
            evaluate_and_log(epoch + 1)
            state["finished"] = state["finished"] or state["epoch"] >= epochs
            checkpoint()
            last_checkpoint = time.perf_counter()
            if should_stop():
                break

    if flag["stop"]:
        if main:
            tqdm.write(f"interrupted at step {state['step']}; checkpoint saved, resume to continue")
        raise KeyboardInterrupt
    if best is None and valid is not None and run_dir is not None and (run_dir / WEIGHTS).exists():
        best = load_file(str(run_dir / WEIGHTS), device=str(device))  # best came before the resume
    if best is not None:
        model.load_state_dict(best)
    return {
        "step": state["step"],
        "epoch": state["epoch"],
        "finished": state["finished"],
        "best_valid": state["best_valid"],
        "elapsed": state["elapsed"],
        "images_per_s": state["images"] / max(state["elapsed"], 1e-9),
    }
