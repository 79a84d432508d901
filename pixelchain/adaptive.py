"""Adaptive attacks on PixelDefend: the attacker knows the classifier, the density model and the purifier.

    defended = adaptive.Defended(partial(defend.purify, model, eps=32, progress=False), classifier)
    result = adaptive.pgd(classifier, defended, x, labels, eps=8, steps=100, restarts=2)
    result.robust      # bool [N]: no iterate of any restart fooled classifier(purify(.)) on this image
    result.accuracy    # robust accuracy, the worst case over iterates and restarts
    result.curve       # [(step, robust accuracy)]: has it flattened?

Threat model: L-inf, ``eps`` in levels (0-255 units for 256 levels), white box. The attacks run on
int64 levels; the purifier is an ART preprocessing defence of an ART ``PyTorchClassifier``, so ART's
``loss_gradient`` differentiates classifier(purify(x)) by one of two routes:

* ``identity`` (BPDA, Athalye et al. 2018): ``BPDAPurifier``, a numpy ``Preprocessor`` whose
  ``estimate_gradient`` is ART's default, the identity. ART allows a numpy preprocessor only alone
  (or followed by its standardisation), so the estimator gets ``preprocessing=None``.
* ``surrogate``: ``SurrogatePurifier``, a ``PreprocessorPyTorch`` whose forward value is the real
  purification and whose gradient is that of ``smooth_purify``: per dimension, the softmax-weighted
  mean of the values in a soft eps-window under the density model's conditionals, teacher-forced on
  the purified image (one forward pass), whose gradient passes to the input as the identity.

``pgd`` is sign-gradient PGD on integer levels over ART's ``loss_gradient`` (random starts,
restarts); ``apgd`` runs ART's ``AutoProjectedGradientDescent`` (CE or DLR loss) through the same
estimator; ``detector_aware`` attacks adaptive PixelDefend while a penalty on (relaxed) bits/dim
keeps its images below the detector's threshold. Whatever the attack, every image the defence sees
goes through ``Defended``, which caches the defence by image content and reports the classifier's
label of each new image to ``WorstCase``: an original counts as robust only if no image within its
eps-ball that the attack ever evaluated, of any restart, fooled the defended classifier. Checking
an iterate costs a purification (a 784-step cached decode per batch), which the gradient step needs
anyway on both routes: each step costs one purification of the still-robust images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import UnitLogits, project
from .classifiers import Classifier
from .models.base import AutoregressiveModel, check_eps
from .runtime import intra_op_threads

METHODS = ("bpda", "apgd-ce", "apgd-dlr")
ROUTES = ("identity", "surrogate")
TEMPERATURE, SOFTNESS = 0.3, 0.1  # the smooth purifier's defaults: see smooth_purify


class WorstCase:
    """Per original image (x int64 [N, C, H, W], labels [N]): is it still robust, and a fooling image.

    ``observe(images, predictions)`` takes any images the defended classifier labelled: each counts
    against every original whose eps-ball holds it (L-inf, levels) and whose label it missed."""

    def __init__(self, x: Tensor, labels: Tensor, eps: int) -> None:
        self.x, self.labels, self.eps = x.long().cpu(), labels.long().cpu(), check_eps(eps)
        self.robust = torch.ones(len(x), dtype=torch.bool)
        self.x_adv = self.x.clone()  # the first fooling image found, else the original
        self.curve: list[tuple[int, float]] = []

    def owners(self, images: Tensor) -> Tensor:
        """bool [n, N]: image i lies within eps of original j."""
        flat, originals = images.long().cpu().flatten(1), self.x.flatten(1)
        return torch.stack([(originals - row).abs().amax(1) <= self.eps for row in flat]) if len(flat) else (
            torch.zeros(0, len(self.x), dtype=torch.bool))

    def observe(self, images: Tensor, predictions: Tensor) -> None:
        fooled = self.owners(images) & (predictions.cpu().view(-1, 1) != self.labels.view(1, -1))  # [n, N]
        for j in (fooled.any(0) & self.robust).nonzero().flatten().tolist():
            self.x_adv[j] = images[int(fooled[:, j].nonzero()[0])].cpu()
        self.robust &= ~fooled.any(0)

    def mark(self, step: int) -> None:
        self.curve.append((step, self.accuracy))

    @property
    def accuracy(self) -> float:
        return self.robust.double().mean().item()


class Defended:
    """A defence (int64 levels [n, C, H, W] -> int64 levels) cached by image content, with the
    classifier's label of each defended image; every image it is asked about, cached or not, is
    reported to ``tracker`` (several attacks may share one cache, each with its own tracker)."""

    def __init__(self, defence: Callable[[Tensor], Tensor], classifier: Classifier,
                 tracker: WorstCase | None = None, max_cached: int = 4096) -> None:
        self.defence, self.classifier, self.tracker, self.max_cached = defence, classifier, tracker, max_cached
        self.cache: dict[bytes, tuple[Tensor, int]] = {}  # image bytes -> (defended image, its label)
        self.calls = 0  # defence calls that had new images
        self.images = 0  # images defended
        self.mark_from: int | None = None  # if set: the tracker's curve gains a point per call with new images

    def __call__(self, x: Tensor) -> Tensor:
        x = x.long().cpu()
        keys = [row.numpy().tobytes() for row in x]
        new = sorted({i for i, k in enumerate(keys) if k not in self.cache})
        if new:
            index, needed = torch.tensor(new), set(keys)
            excess = len(self.cache) + len(index) - self.max_cached
            for key in [k for k in self.cache if k not in needed][: max(0, excess)]:
                del self.cache[key]  # the oldest first, never one this call reads
            out = self.defence(x[index]).long().cpu()
            with torch.no_grad():
                labels = self.classifier.predict(out.to(next(self.classifier.parameters()).device)).cpu()
            for i, row, label in zip(index.tolist(), out, labels.tolist(), strict=True):
                self.cache[keys[i]] = (row, label)
            self.calls, self.images = self.calls + 1, self.images + len(index)
        if not keys:
            return x.clone()
        hits = [self.cache[k] for k in keys]
        if self.tracker is not None:
            self.tracker.observe(x, torch.tensor([label for _, label in hits]))
            if new and self.mark_from is not None:
                self.tracker.mark(self.calls - self.mark_from)
        return torch.stack([row for row, _ in hits])


# ----------------------------------------------------------------- a smooth purifier
def all_log_probs(model: AutoregressiveModel, v: Tensor) -> Tensor:
    """log p(x_d = k | x_<d) for every value k, teacher-forced on float levels v [B, C, H, W] (the
    model's forward reads its input through ``image``, so it is differentiable in v): [B, C, H, W, K]."""
    params = model(v)  # [B, P, H, W]
    B, C, H, W = v.shape
    pixels = params.permute(0, 2, 3, 1).reshape(B * H * W, -1)
    values = v.permute(0, 2, 3, 1).reshape(B * H * W, C)
    per_channel = [model.head.conditional(pixels, values, c) for c in range(C)]  # each [BHW, K]
    return torch.stack(per_channel, 1).view(B, H, W, C, -1).permute(0, 3, 1, 2, 4)


def smooth_purify(model: AutoregressiveModel, v: Tensor, eps: int, temperature: float = TEMPERATURE,
                  softness: float = SOFTNESS, prefix: Tensor | None = None) -> Tensor:
    """A differentiable stand-in for ``defend.purify``: float levels v [B, C, H, W] -> [B, C, H, W].

    Each dimension becomes sum_k k * softmax_k(log p(k | prefix_<d) / temperature + log w(k)), where
    the soft window w(k) = sigmoid((eps + 1/2 - |k - v_d|) / softness) replaces the hard
    [v - eps, v + eps] (so the output moves with v_d where the window's edge binds, as the argmax
    does). ``prefix`` (default: v) is the image the conditionals are teacher-forced on: given the
    purified image, they are the ones purification used, and a cold softmax is its argmax."""
    K = model.num_levels
    log_probs = all_log_probs(model, v if prefix is None else prefix)
    values = torch.arange(K, dtype=v.dtype, device=v.device)
    log_window = F.logsigmoid((eps + 0.5 - (values - v.unsqueeze(-1)).abs()) / softness)
    weights = (log_probs.to(v.dtype) / temperature + log_window).softmax(-1)
    return (weights * values).sum(-1)


def relaxed_bits_per_dim(model: AutoregressiveModel, v: Tensor) -> Tensor:
    """Bits/dim of float levels v [B, C, H, W], each dimension's log-probability interpolated linearly
    between its two neighbouring levels: [B]; at integer v it is ``model.bits_per_dim``."""
    K = model.num_levels
    log_probs = all_log_probs(model, v)
    low = v.detach().floor().clamp(0, K - 2)
    frac = (v - low).unsqueeze(-1)
    low = low.long().unsqueeze(-1)
    lp = (1 - frac) * log_probs.gather(-1, low) + frac * log_probs.gather(-1, low + 1)
    return -lp.flatten(1).sum(1) / (model.num_dims * math.log(2))


# ----------------------------------------------------------------- ART's pieces
@lru_cache(maxsize=1)
def _preprocessor_classes():
    try:
        from art.defences.preprocessor.preprocessor import Preprocessor, PreprocessorPyTorch
    except ImportError as error:
        raise ImportError(f"adaptive attacks need the Adversarial Robustness Toolbox: pip install -e '.[defend]' "
                          f"({error})") from None

    class BPDAPurifier(Preprocessor):
        """The defence on [0, 1] floats (rounded to levels first); ART's default ``estimate_gradient``,
        the identity, makes it BPDA."""

        def __init__(self, defended: Defended, num_levels: int) -> None:
            super().__init__(is_fitted=True, apply_fit=False, apply_predict=True)
            self.defended, self.num_levels = defended, num_levels

        def __call__(self, x: np.ndarray, y=None):
            levels = torch.from_numpy(np.rint(x.astype(np.float64) * (self.num_levels - 1))).long()
            return (self.defended(levels).numpy() / (self.num_levels - 1)).astype(x.dtype), y

    class SurrogatePurifier(PreprocessorPyTorch):
        """Forward: the real defence; gradient: that of ``smooth_purify`` (straight-through)."""

        def __init__(self, defended: Defended, model: AutoregressiveModel, eps: int, temperature: float,
                     softness: float) -> None:
            super().__init__(device_type="gpu" if model.device.type == "cuda" else "cpu", is_fitted=True,
                             apply_fit=False, apply_predict=True)
            self.defended, self.model, self.eps = defended, model, eps
            self.temperature, self.softness = temperature, softness

        def forward(self, x: Tensor, y=None):
            K = self.model.num_levels
            levels = (x.detach().double() * (K - 1)).round().long()
            hard = self.defended(levels).to(x.device, x.dtype) / (K - 1)
            if not (torch.is_grad_enabled() and x.requires_grad):
                return hard, y
            v = x.to(self.model.dtype) * (K - 1)
            prefix = hard.to(v.dtype) * (K - 1) + (v - v.detach())  # the purified image, moving with the input
            soft = smooth_purify(self.model, v, self.eps, self.temperature, self.softness, prefix).to(x.dtype) / (K - 1)
            return hard + soft - soft.detach(), y

    return BPDAPurifier, SurrogatePurifier


def estimator(classifier: Classifier, preprocessor, loss: nn.Module | None = None):
    """ART PyTorchClassifier on [0, 1] floats with ``preprocessor`` as its only preprocessing."""
    from art.estimators.classification import PyTorchClassifier

    classifier.eval()
    return PyTorchClassifier(model=UnitLogits(classifier), loss=loss or nn.CrossEntropyLoss(),
                             input_shape=classifier.image_shape, nb_classes=classifier.num_classes,
                             clip_values=(0.0, 1.0), preprocessing_defences=preprocessor, preprocessing=None,
                             device_type="gpu" if classifier.device.type == "cuda" else "cpu")


def preprocessor(defended: Defended, route: str = "identity", model: AutoregressiveModel | None = None,
                 eps_def: int | None = None, temperature: float = TEMPERATURE, softness: float = SOFTNESS):
    """The ART preprocessing defence of ``route``: 'identity' (BPDA) or 'surrogate' (needs model, eps_def)."""
    if not temperature > 0 or not softness > 0:
        raise ValueError(f"temperature and softness must be > 0, got {temperature}, {softness}")
    BPDAPurifier, SurrogatePurifier = _preprocessor_classes()
    if route == "identity":
        return BPDAPurifier(defended, defended.classifier.num_levels)
    if route == "surrogate":
        if model is None or eps_def is None:
            raise ValueError("the surrogate route needs the density model and eps_def")
        return SurrogatePurifier(defended, model, check_eps(eps_def), temperature, softness)
    raise ValueError(f"unknown gradient route {route!r}; choose from {ROUTES}")


@dataclass
class AttackResult:
    robust: Tensor  # bool [N]
    x_adv: Tensor  # int64 [N, C, H, W]: a fooling image per fooled original, else the last iterate
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, robust accuracy)
    purified: int = 0  # images the defence processed
    last: Tensor | None = None  # int64 [N, C, H, W]: the last iterate (the original where never attacked)

    @property
    def accuracy(self) -> float:
        return self.robust.double().mean().item()


def _start(x: Tensor, eps: int, K: int, random: bool, generator: torch.Generator | None) -> Tensor:
    if not random:
        return x.clone()
    return project(x + torch.randint(-eps, eps + 1, x.shape, generator=generator), x, eps, K)


def _check(x: Tensor, labels: Tensor, eps: int, steps: int, restarts: int, classifier: Classifier):
    eps = check_eps(eps)
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
    x, labels = classifier.check_input(x, labels)
    if labels is None:
        raise ValueError("adaptive attacks need the true labels [B]")
    return x.cpu(), labels.cpu(), eps


def pgd(
    classifier: Classifier,
    defended: Defended,
    x: Tensor,
    labels: Tensor,
    eps: int,
    *,
    steps: int = 100,
    step_size: int = 1,
    restarts: int = 1,
    random_start: bool = True,
    route: str = "identity",
    model: AutoregressiveModel | None = None,
    eps_def: int | None = None,
    temperature: float = TEMPERATURE,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> AttackResult:
    """PGD on integer levels against classifier(defence(x)): x_{t+1} = clip_eps(x_t + step_size *
    sign(grad)), the gradient from ART's ``loss_gradient`` through the defence by ``route``. Each
    restart starts from uniform integer noise in the eps-ball (``random_start``) and attacks the
    images still robust; the curve's step counts steps over all restarts (step 0: the clean images)."""
    x, labels, eps = _check(x, labels, eps, steps, restarts, classifier)
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    K = classifier.num_levels
    tracker = defended.tracker = WorstCase(x, labels, eps)
    est = estimator(classifier, preprocessor(defended, route, model, eps_def, temperature))
    start_images = defended.images
    defended(x)  # the clean images, defended
    tracker.mark(0)
    last = x.clone()
    bar = tqdm(total=steps * restarts, desc=f"PGD ({route})", unit="step", disable=not progress)
    for restart in range(restarts):
        active = tracker.robust.nonzero().flatten()
        if len(active) == 0:
            break
        x0, y0 = x[active], labels[active]
        x_t = _start(x0, eps, K, random_start, generator)
        for step in range(1, steps + 1):
            keep = tracker.robust[active]  # drop images already fooled: the worst case holds them
            active, x0, y0, x_t = active[keep], x0[keep], y0[keep], x_t[keep]
            if len(active) == 0:
                break
            u = (x_t.double() / (K - 1)).numpy().astype(np.float32)
            onehot = np.eye(classifier.num_classes, dtype=np.float32)[y0.numpy()]
            with intra_op_threads(1):  # ``batch_size`` images a call: the surrogate's graph is large
                grad = np.concatenate([est.loss_gradient(u[i : i + batch_size], onehot[i : i + batch_size])
                                       for i in range(0, len(u), batch_size)])
            grad = np.nan_to_num(grad, nan=0.0)  # a dimension whose gradient underflowed does not move
            x_t = project(x_t + step_size * torch.from_numpy(np.sign(grad)).long(), x0, eps, K)
            defended(x_t)  # checks the new iterate; cached for the next gradient
            last[active] = x_t
            tracker.mark(restart * steps + step)
            bar.update(1)
    bar.close()
    x_adv = torch.where(tracker.robust.view(-1, 1, 1, 1), last, tracker.x_adv)
    return AttackResult(tracker.robust.clone(), x_adv, tracker.curve, defended.images - start_images, last)


def apgd(
    classifier: Classifier,
    defended: Defended,
    x: Tensor,
    labels: Tensor,
    eps: int,
    *,
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    route: str = "identity",
    model: AutoregressiveModel | None = None,
    eps_def: int | None = None,
    temperature: float = TEMPERATURE,
    seed: int = 0,
    progress: bool = True,
) -> AttackResult:
    """ART's AutoProjectedGradientDescent (Croce & Hein 2020; ``loss`` 'ce' or 'dlr') against
    classifier(defence(x)), one random start per restart on the images still robust. ART works on
    floats; the defence sees them rounded to levels (inside the eps-ball). The curve's step counts
    the defence's calls with new images (about one per APGD iteration)."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    x, labels, eps = _check(x, labels, eps, steps, restarts, classifier)
    if loss not in ("ce", "dlr"):
        raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
    if loss == "dlr" and classifier.num_classes < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, the classifier has {classifier.num_classes}")
    K = classifier.num_levels
    tracker = defended.tracker = WorstCase(x, labels, eps)
    est = estimator(classifier, preprocessor(defended, route, model, eps_def, temperature))
    start_images, start_calls = defended.images, defended.calls
    defended(x)
    tracker.mark(0)
    attack = AutoProjectedGradientDescent(
        est, norm=np.inf, eps=eps / (K - 1), eps_step=2 * eps / (K - 1), max_iter=steps, nb_random_init=1,
        batch_size=len(x), loss_type="cross_entropy" if loss == "ce" else "difference_logits_ratio", verbose=False)
    last = x.clone()
    np.random.seed(seed)  # ART draws its random starts from numpy's global generator
    defended.mark_from = start_calls  # a point of the curve per call: ART's iterations run inside generate
    try:
        for _ in tqdm(range(restarts), desc=f"APGD-{loss.upper()}", unit="restart", disable=not progress):
            active = tracker.robust.nonzero().flatten()
            if len(active) == 0:
                break
            onehot = np.eye(classifier.num_classes, dtype=np.float32)[labels[active].numpy()]
            with intra_op_threads(1):
                u = attack.generate((x[active].double() / (K - 1)).numpy().astype(np.float32), y=onehot)
            x_r = project(torch.from_numpy(np.rint(u.astype(np.float64) * (K - 1))).long(), x[active], eps, K)
            defended(x_r)
            last[active] = x_r
            if not tracker.curve or tracker.curve[-1] != (defended.calls - start_calls, tracker.accuracy):
                tracker.mark(defended.calls - start_calls)
    finally:
        defended.mark_from = None
    x_adv = torch.where(tracker.robust.view(-1, 1, 1, 1), last, tracker.x_adv)
    return AttackResult(tracker.robust.clone(), x_adv, tracker.curve, defended.images - start_images, last)


def bpd_limit(reference_bpd: Tensor, threshold: float) -> float:
    """The largest bits/dim whose p-value against ``reference_bpd`` stays above ``threshold``:
    images at or below it are not purified by adaptive PixelDefend (``defend.p_values``)."""
    reference = torch.as_tensor(reference_bpd, dtype=torch.float64).flatten().sort(descending=True).values
    # p(b) = (1 + #{ref >= b}) / (N + 1) > threshold  <=>  #{ref >= b} >= m
    m = math.floor(threshold * (len(reference) + 1) - 1) + 1
    if m <= 0:
        return math.inf
    if m > len(reference):
        return -math.inf
    return float(reference[m - 1])


def detector_aware(
    classifier: Classifier,
    model: AutoregressiveModel,
    defended: Defended,
    x: Tensor,
    labels: Tensor,
    eps: int,
    limit: float,
    *,
    penalty: float = 10.0,
    margin: float = 0.02,
    steps: int = 100,
    step_size: int = 1,
    restarts: int = 1,
    check_every: int = 5,
    fraction: float = 0.1,
    batch_size: int = 50,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> AttackResult:
    """PGD against adaptive PixelDefend by an attacker who stays undetected: ascend
    CE(classifier(x), y) - penalty * relu(relaxed bits/dim(x) - (limit - margin)), so that the
    detector (which purifies images above ``limit`` bits/dim, see ``bpd_limit``) lets the image through
    to the classifier. Each step moves only the ``fraction`` of dimensions with the largest gradient
    (a sign step on every dimension adds noise that the density model sees at once). ``defended`` is
    the adaptive defence (``defend.adaptive_purify``); every ``check_every`` steps (and at the last)
    the iterates go through it and the worst case is kept."""
    x, labels, eps = _check(x, labels, eps, steps, restarts, classifier)
    if step_size < 1 or check_every < 1:
        raise ValueError(f"step_size and check_every must be >= 1, got {step_size}, {check_every}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    K = classifier.num_levels
    tracker = defended.tracker = WorstCase(x, labels, eps)
    start_images = defended.images
    defended(x)
    tracker.mark(0)
    classifier.eval()
    model.eval()
    last = x.clone()
    bar = tqdm(total=steps * restarts, desc="detector-aware PGD", unit="step", disable=not progress)
    for restart in range(restarts):
        active = tracker.robust.nonzero().flatten()
        if len(active) == 0:
            break
        x0, y0 = x[active], labels[active]
        x_t = _start(x0, eps, K, restart > 0, generator)  # the first start is the image itself: low bits/dim
        for step in range(1, steps + 1):
            grads = []
            for xb, yb in zip(x_t.split(batch_size), y0.split(batch_size), strict=True):
                v = xb.to(model.device, model.dtype).requires_grad_()
                u = (v / (K - 1)).to(next(classifier.parameters()).dtype)
                ce = F.cross_entropy(classifier.logits_from_unit(u), yb.to(model.device), reduction="sum")
                over = F.relu(relaxed_bits_per_dim(model, v) - (limit - margin)).sum()
                grads.append(torch.autograd.grad(ce - penalty * over, v)[0].cpu())
            grad = torch.cat(grads).flatten(1).nan_to_num(nan=0.0)
            k = max(1, round(fraction * grad.shape[1]))
            top = grad.abs().topk(k, dim=1).indices
            move = torch.zeros_like(grad).scatter_(1, top, grad.gather(1, top).sign()).view_as(x_t)
            x_t = project(x_t + step_size * move.long(), x0, eps, K)
            if step % check_every == 0 or step == steps:
                keep = tracker.robust[active]
                active, x0, y0, x_t = active[keep], x0[keep], y0[keep], x_t[keep]
                defended(x_t)
                last[active] = x_t
                tracker.mark(restart * steps + step)
                if len(active) == 0:
                    break
            bar.update(1)
    bar.close()
    x_adv = torch.where(tracker.robust.view(-1, 1, 1, 1), last, tracker.x_adv)
    return AttackResult(tracker.robust.clone(), x_adv, tracker.curve, defended.images - start_images, last)
