"""Adversarial examples for the classifiers, through the Adversarial Robustness Toolbox (ART).

    x_adv = attacks.attack(classifier, x, labels, "fgsm", eps=8)      # int64 levels, |x_adv - x| <= 8

Images are int64 levels in [0, K); ``eps`` is in levels (0-255 units for 256-level images). The
classifier is wrapped as an ART ``PyTorchClassifier`` on floats in [0, 1] (``logits_from_unit``);
ART's result is rounded back to levels and clipped to the eps-ball around x and to [0, K).
ART is an optional extra: ``pip install -e .[defend]``. The attacks that know the purifier
(BPDA, APGD through it) are in :mod:`pixelchain.adaptive`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .classifiers import Classifier
from .models.base import check_eps
from .runtime import intra_op_threads

ATTACKS = ("random", "fgsm", "bim", "pgd", "deepfool", "cw")


class UnitLogits(nn.Module):
    """The classifier as a function of float images in [0, 1] (what ART differentiates)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, u: Tensor) -> Tensor:
        return self.classifier.logits_from_unit(u.to(next(self.classifier.parameters()).dtype))


def art_classifier(classifier: Classifier):
    """``classifier`` (in eval mode) as an ART PyTorchClassifier on [0, 1] floats [B, C, H, W]."""
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError as error:
        raise ImportError("attacks need the Adversarial Robustness Toolbox: pip install -e '.[defend]' "
                          f"(adversarial-robustness-toolbox and packaging) ({error})") from None
    classifier.eval()
    return PyTorchClassifier(model=UnitLogits(classifier), loss=nn.CrossEntropyLoss(),
                             input_shape=classifier.image_shape, nb_classes=classifier.num_classes,
                             clip_values=(0.0, 1.0), device_type="gpu" if classifier.device.type == "cuda" else "cpu")


def project(x_adv: Tensor, x: Tensor, eps: int, num_levels: int) -> Tensor:
    """Clip x_adv to the eps-ball around x and to [0, K): int64 [B, C, H, W]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, num_levels - 1)


def attack(
    classifier: Classifier,
    x: Tensor,
    labels: Tensor,
    name: str,
    eps: int,
    *,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial images int64 [B, C, H, W] within ``eps`` levels of x [B, C, H, W] (true labels [B]).

    name: 'random' (uniform integer noise in [-eps, eps], drawn from ``generator``), 'fgsm', 'bim'
    (10 steps of 1 level), 'pgd' (Madry et al.: a uniform random start in the ball, then 20 steps of
    max(1, eps/4) levels; the start is drawn from ``generator``), 'deepfool' (overshoot 0.02, 50
    iterations), 'cw' (Carlini-Wagner L-inf). DeepFool and C&W are unbounded; their result is clipped
    to the eps-ball.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")
    eps = check_eps(eps, classifier.num_levels)
    x, labels = classifier.check_input(x, labels)
    if labels is None:
        raise ValueError("attacks need the true labels [B]")
    K = classifier.num_levels
    if name == "random":
        noise = torch.randint(-eps, eps + 1, x.shape, generator=generator).to(x.device)
        return project(x + noise, x, eps, K)
    from art.attacks.evasion import (
        BasicIterativeMethod,
        CarliniLInfMethod,
        DeepFool,
        FastGradientMethod,
        ProjectedGradientDescent,
    )

    estimator = art_classifier(classifier)
    step = 1.0 / (K - 1)
    made = {
        "fgsm": lambda: FastGradientMethod(estimator, eps=eps * step, batch_size=batch_size),
        "bim": lambda: BasicIterativeMethod(estimator, eps=eps * step, eps_step=step, max_iter=10,
                                            batch_size=batch_size, verbose=False),
        "pgd": lambda: ProjectedGradientDescent(estimator, norm=np.inf, eps=eps * step,
                                                eps_step=max(1, eps // 4) * step, max_iter=20, num_random_init=1,
                                                batch_size=batch_size, verbose=False),
        "deepfool": lambda: DeepFool(estimator, max_iter=50, epsilon=0.02, nb_grads=classifier.num_classes,
                                     batch_size=batch_size, verbose=False),
        "cw": lambda: CarliniLInfMethod(estimator, batch_size=batch_size, verbose=False),
    }[name]()
    u = (x.double() * step).cpu().numpy().astype(np.float32)
    numpy_state = np.random.get_state()  # ART draws PGD's random start from numpy's global generator
    if generator is not None:
        np.random.seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    try:
        with intra_op_threads(1):  # ART's tiny passes: ~100x slower at 2 threads on two busy cores
            u_adv = made.generate(u, y=labels.cpu().numpy())
    finally:
        np.random.set_state(numpy_state)
    x_adv = torch.from_numpy(np.rint(u_adv.astype(np.float64) * (K - 1))).long().to(x.device)
    return project(x_adv, x, eps, K)
