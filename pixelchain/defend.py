"""PixelDefend (Song et al., ICLR 2018): detect adversarial images by their likelihood under a density
model, and purify them back towards the data before a classifier sees them.

    bpd = defend.bits_per_dim(model, x)                        # [N], under the density model
    p = defend.p_values(bpd, defend.bits_per_dim(model, reference))   # small p: atypically unlikely
    x_pure = defend.purify(model, x, eps=16)                   # int64 [N, C, H, W]

Images are int64 levels [N, C, H, W] in [0, K) of the density model. Purification runs the one
decoding loop (pixelchain.decode) with the ``MostLikelyInWindow`` policy and the model's cached
decoder: each dimension, in the model's order (R, G, B inside a pixel), becomes the most likely value
within [x - eps, x + eps] of the *input's* value given the already purified dimensions. The
adaptive variant leaves images whose p-value is above a threshold (chosen on clean validation
images) unchanged. Attacks live in pixelchain.attacks.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from . import score
from .models.base import AutoregressiveModel, check_eps
from .ood import p_values  # noqa: F401  (defend.p_values: PixelDefend's detector)
from .score import check_density


def check_pair(classifier: nn.Module, model: AutoregressiveModel) -> None:
    """ValueError unless the classifier and the density model take the same images (shape, levels)."""
    if tuple(classifier.image_shape) != tuple(model.image_shape) or classifier.num_levels != model.num_levels:
        raise ValueError(
            f"classifier {classifier.name!r} takes images {tuple(classifier.image_shape)} with {classifier.num_levels} "
            f"levels, density model {model.name!r} {tuple(model.image_shape)} with {model.num_levels}: they must match"
        )


def bits_per_dim(model: AutoregressiveModel, x: Tensor, batch_size: int = 256, progress: bool = True) -> Tensor:
    """-log2 p(x) / D of each image under ``model``: x int64 [N, C, H, W] -> float64 [N] (on the CPU)."""
    x = check_density(model).check_input(x)[0]
    return -score.log_prob(model, x, batch_size=batch_size, progress=progress) / (model.num_dims * math.log(2))


def auroc(clean: Tensor, attacked: Tensor) -> float:
    """Area under the ROC curve of telling attacked from clean by a score that is higher for attacked
    images (e.g. bits/dim): P(score_attacked > score_clean) + P(tie) / 2 (Mann-Whitney)."""
    clean, attacked = (torch.as_tensor(s, dtype=torch.float64).flatten() for s in (clean, attacked))
    if len(clean) == 0 or len(attacked) == 0:
        raise ValueError("AUROC needs at least one clean and one attacked score")
    ranks = rankdata(torch.cat([clean, attacked]).numpy())  # average ranks for ties
    n, m = len(attacked), len(clean)
    return float((ranks[m:].sum() - n * (n + 1) / 2) / (n * m))


def choose_threshold(clean_p: Tensor, false_alarm: float = 0.05) -> float:
    """The largest p-value threshold t with at most ``false_alarm`` of the clean (validation)
    images at p <= t: those are the clean images adaptive purification would touch. 0 if none."""
    if not 0 <= false_alarm < 1:
        raise ValueError(f"false_alarm must lie in [0, 1), got {false_alarm}")
    p = torch.as_tensor(clean_p, dtype=torch.float64).flatten().sort().values
    if len(p) == 0:
        raise ValueError("choosing a threshold needs clean p-values")
    values = p.unique()
    rate = torch.searchsorted(p, values, right=True).double() / len(p)
    allowed = values[rate <= false_alarm]
    return float(allowed.max()) if len(allowed) else 0.0


def purify(
    model: AutoregressiveModel,
    x: Tensor,
    eps: int,
    *,
    batch_size: int = 64,
    naive: bool = False,
    progress: bool = True,
) -> Tensor:
    """PixelDefend purification of x int64 [N, C, H, W] within ``eps`` levels: int64 [N, C, H, W] on x's
    device. Batches of ``batch_size`` images run the decoding loop with the model's cached decoder
    (``naive=True``: the reference decoder, a full forward pass per dimension)."""
    check_density(model)
    x = model.check_input(x)[0]
    return model.purify(x.to(model.device), eps, naive=naive, progress=progress, batch_size=batch_size).to(x.device)


def adaptive_purify(
    model: AutoregressiveModel,
    x: Tensor,
    eps: int,
    reference_bpd: Tensor,
    threshold: float,
    *,
    bpd: Tensor | None = None,
    batch_size: int = 64,
    naive: bool = False,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Adaptive PixelDefend: purify (within ``eps``) only the images whose p-value against
    ``reference_bpd`` is <= ``threshold`` (see ``choose_threshold``); the others get eps = 0 and
    stay as they are. Returns (images int64 [N, C, H, W], purified bool [N]). ``bpd``: the images'
    bits/dim if already computed."""
    x, eps = model.check_input(x)[0], check_eps(eps, model.num_levels)
    if bpd is None:
        bpd = bits_per_dim(model, x, progress=progress)
    touched = p_values(bpd, reference_bpd) <= threshold
    out = x.clone()
    if touched.any():
        index = touched.nonzero().squeeze(1).to(x.device)
        out[index] = purify(model, x[index], eps, batch_size=batch_size, naive=naive, progress=progress)
    return out, touched


@torch.no_grad()
def correct(classifier: nn.Module, x: Tensor, labels: Tensor, batch_size: int = 512) -> Tensor:
    """Whether ``classifier`` labels each image of x int64 [N, C, H, W] correctly: bool [N] (on the CPU)."""
    classifier.eval()
    x, labels = classifier.check_input(x, labels)
    device = next(classifier.parameters()).device
    return torch.cat([classifier.predict(xb.to(device)).cpu() == yb.cpu()
                      for xb, yb in zip(x.split(batch_size), labels.split(batch_size), strict=True)])


def accuracy(classifier: nn.Module, x: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of images x int64 [N, C, H, W] that ``classifier`` labels correctly."""
    return int(correct(classifier, x, labels, batch_size).sum()) / len(x)

