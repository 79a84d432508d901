"""Out-of-distribution detection with the exact likelihood.

    det = ood.Detector(model, reference)      # score="combined"; reference: held-out in-distribution images
    s = det.score(x)          # [N] float64, higher = more atypical
    p = det.p_values(x)       # [N] in (0, 1], small = atypical, against the reference images
    ratio = ood.Detector(model, reference, "ratio", background=pc.load("fmnist_background"))

Raw bits/dim is the famous wrong answer: a model of Fashion-MNIST gives MNIST *higher* likelihood than
its own test images (Nalisnick et al. 2019). The scores here, each "higher = more atypical":

- ``bpd``: bits/dim, -log2 p(x) / D (PixelDefend's detector);
- ``typicality``: |bits/dim - its reference mean|: too likely is atypical too (Nalisnick et al. 2019);
  ``batch_typicality`` is their test of a whole batch;
- ``ratio``: bits/dim minus bits/dim under a *background* model of the same family trained on
  perturbed inputs (Ren et al. 2019): low-level statistics cancel, what the background cannot explain
  stays (``perturb``, ``PerturbedDataset``, benchmarks/train_background.py);
- ``complexity``: bits/dim minus the bits/dim of a generic lossless codec (Serrà et al. 2020):
  ``codec`` "png" or "jpegxl" (imagecodecs);
- ``orientation``: bits/dim of the image minus bits/dim of the image turned upside down: a ratio
  whose "background" is the model itself on the same pixels (the same histogram and complexity, so
  they cancel), positive when the image reads better the other way up: the test for images that are
  likely pixel by pixel but in the wrong places, which no per-image likelihood sees;
- ``local``: where the model is surprised: the model's bits in each band of rows, z-scored against
  the reference images' bands and squared, averaged (a typicality test on the map of log p);
  flipped or shifted images put likely pixels in unlikely places;
- ``combined``: Fisher's combination of the p-values of ``COMBINED`` (complexity and orientation,
  chosen on validation sets: benchmarks/ood.py): -sum log p_i, itself ranked against the reference
  images' leave-one-out values, so its p-value is calibrated like the others'.

Every score's p-value is (1 + #{reference images scoring at least as high}) / (N + 1): uniform under
the null that the image is drawn like the reference (held-out in-distribution images, not training ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import score
from .data import ImageDataset
from .models.base import AutoregressiveModel
from .score import check_density

SCORES = ("bpd", "typicality", "ratio", "complexity", "orientation", "local", "combined")
COMBINED = ("complexity", "orientation")  # chosen on validation images (benchmarks/ood.py, BENCHMARKS.md)
CODECS = ("png", "jpegxl")
BACKGROUNDS = {"fmnist_pixelcnn_pp": "fmnist_background"}  # shipped model -> its shipped background model
BANDS = 7  # rows of the image split into this many bands for ``local``


def p_values(score: Tensor, reference_score: Tensor) -> Tensor:
    """(1 + #{reference scores >= the image's}) / (N + 1) per image: score [M], reference [N] (higher =
    more atypical, e.g. bits/dim) -> [M] in (0, 1]. Under the null (the image is drawn like the
    reference) the p-value is uniform on {1, ..., N+1}/(N+1)."""
    reference = torch.as_tensor(reference_score, dtype=torch.float64).flatten().sort().values
    if len(reference) == 0:
        raise ValueError("p-values need at least one reference image")
    score = torch.as_tensor(score, dtype=torch.float64)
    if torch.isnan(score).any() or torch.isnan(reference).any():
        raise ValueError("scores contain NaN")
    at_least = len(reference) - torch.searchsorted(reference, score, right=False)
    return (1 + at_least).double() / (len(reference) + 1)


def _leave_one_out_p(reference_score: Tensor) -> Tensor:
    """Each reference image's p-value against the others: (1 + #{others >= it}) / N."""
    s = torch.as_tensor(reference_score, dtype=torch.float64)
    at_least = len(s) - torch.searchsorted(s.sort().values, s, right=False)  # counts itself
    return at_least.double() / len(s)


def batch_typicality(bpd: Tensor, reference_bpd: Tensor, num_bootstrap: int = 10_000,
                     generator: torch.Generator | None = None) -> float:
    """Nalisnick et al.'s typicality test of a *batch*: p-value of |mean bits/dim - reference mean|
    against the same statistic of ``num_bootstrap`` batches of the batch's size drawn (with
    replacement) from the reference. bpd [M], reference [N] -> p in (0, 1]; small = the batch is atypical."""
    bpd, ref = (torch.as_tensor(t, dtype=torch.float64).flatten() for t in (bpd, reference_bpd))
    if len(bpd) == 0 or len(ref) < 2:
        raise ValueError("the batch typicality test needs at least one image and two reference images")
    centre = ref.mean()
    stat = (bpd.mean() - centre).abs()
    boot = torch.empty(num_bootstrap, dtype=torch.float64)
    for chunk in torch.arange(num_bootstrap).split(max(1, 2**20 // len(bpd))):  # memory bounded
        index = torch.randint(0, len(ref), (len(chunk), len(bpd)), generator=generator)
        boot[chunk] = (ref[index].mean(1) - centre).abs()
    return float((1 + (boot >= stat).sum()) / (num_bootstrap + 1))


def perturb(x: Tensor, mu: float, num_levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Ren et al.'s background-model input: each value of x int64 [N, C, H, W] replaced, with
    probability ``mu``, by a uniform draw from [0, num_levels). Returns a new tensor."""
    if not 0 <= mu <= 1:
        raise ValueError(f"mu must lie in [0, 1], got {mu}")
    swap = torch.rand(x.shape, generator=generator) < mu
    noise = torch.randint(0, num_levels, x.shape, generator=generator)
    return torch.where(swap, noise, x)


@dataclass
class PerturbedDataset(ImageDataset):
    """A dataset whose training batches are perturbed afresh (``perturb`` with rate ``mu``) at every
    call: what the background model of the likelihood ratio trains on."""

    mu: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._generator = torch.Generator().manual_seed(self.seed)

    def batch(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return perturb(self.images[index], self.mu, self.num_levels, generator or self._generator)


def nll_map(model: AutoregressiveModel, x: Tensor, batch_size: int = 256, progress: bool = False) -> Tensor:
    """-log2 p(x_d | x_<d) of every dimension: x int64 [N, C, H, W] -> float32 [N, C, H, W] on the CPU
    (its mean over C, H, W is the image's bits/dim)."""
    x = check_density(model).check_input(x)[0]
    return (-score.log_prob_map(model, x, batch_size=batch_size, progress=progress) / math.log(2)).float()


def codec_bits_per_dim(x: Tensor, num_levels: int, codec: str = "png") -> Tensor:
    """Length of each image under a generic lossless codec, in bits per dimension: x int64 [N, C, H, W]
    with values in [0, num_levels <= 256) -> float64 [N]. ``codec``: "png" (level 9) or "jpegxl" (lossless)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if num_levels > 256 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"codecs take 1 or 3 channels of at most 256 levels, got {tuple(x.shape)} with {num_levels}")
    try:
        import imagecodecs
    except ImportError:
        raise ImportError("the complexity score needs imagecodecs: pip install imagecodecs") from None
    encode = (lambda a: imagecodecs.png_encode(a, level=9)) if codec == "png" else (
        lambda a: imagecodecs.jpegxl_encode(a, lossless=True, effort=7))
    arrays = x.permute(0, 2, 3, 1).to(torch.uint8).numpy()  # [N, H, W, C]
    dims = x[0].numel() if len(x) else 1
    lengths = [8 * len(encode(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))) for a in arrays]
    return torch.tensor(lengths, dtype=torch.float64) / dims


@dataclass
class Features:
    """What the scores are computed from, per image: the model's bits map [N, C, H, W], and where
    asked the background's bits/dim [N], the codec's bits/dim [N] and the model's bits/dim of the
    image upside down [N]."""

    nll_map: Tensor
    background_bpd: Tensor | None = None
    codec_bpd: Tensor | None = None
    flipped_bpd: Tensor | None = None

    @property
    def bpd(self) -> Tensor:
        return self.nll_map.double().flatten(1).mean(1)

    def bands(self, count: int = BANDS) -> Tensor:
        """Bits in each band of rows (channels summed): [N, count]."""
        rows = self.nll_map.double().sum((1, 3))  # [N, H]
        return torch.stack([band.sum(1) for band in rows.tensor_split(count, dim=1)], 1)


def features(model: AutoregressiveModel, x: Tensor, *, background: AutoregressiveModel | None = None,
             codec: str | None = None, flipped: bool = False, batch_size: int = 256,
             progress: bool = False) -> Features:
    """The features of images x int64 [N, C, H, W] that the scores use."""
    x = check_density(model).check_input(x)[0]
    if background is not None:
        check_density(background, "background model")
        if tuple(background.image_shape) != tuple(model.image_shape) or background.num_levels != model.num_levels:
            raise ValueError(f"the background model takes {tuple(background.image_shape)} images with "
                             f"{background.num_levels} levels, the model {tuple(model.image_shape)} with "
                             f"{model.num_levels}: they must match")
    return Features(
        nll_map(model, x, batch_size, progress),
        None if background is None else nll_map(background, x, batch_size, progress).double().flatten(1).mean(1),
        None if codec is None else codec_bits_per_dim(x, model.num_levels, codec),
        nll_map(model, x.flip(2), batch_size, progress).double().flatten(1).mean(1) if flipped else None,
    )


class Detector:
    """An out-of-distribution score fitted to reference (held-out in-distribution) images.

    model: the density model; reference: int64 [N, C, H, W], or their precomputed ``Features``;
    score: one of ``SCORES``; background: the background model (``ratio``, and ``combined`` when its
    scores include the ratio); codec: of ``complexity`` (``CODECS``); combine: the scores ``combined``
    joins (default ``COMBINED``)."""

    def __init__(self, model: AutoregressiveModel, reference: Tensor | Features, score: str = "combined", *,
                 background: AutoregressiveModel | None = None, codec: str = "png",
                 combine: tuple[str, ...] | None = None, batch_size: int = 256, progress: bool = False) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
        if combine is not None and not set(combine) <= set(SCORES) - {"combined"}:
            raise ValueError(f"combine takes scores from {', '.join(SCORES[:-1])}, got {combine}")
        self.model, self.score_name, self.background, self.codec = check_density(model), score, background, codec
        self._combine = combine
        self.batch_size, self.progress = batch_size, progress
        needs = {score} | (set(self.components) if score == "combined" else set())
        if "ratio" in needs and background is None:
            raise ValueError("the ratio score needs a background model (Ren et al.): pass background=")
        self._codec = codec if "complexity" in needs else None
        self._background = background if "ratio" in needs else None
        self._flipped = "orientation" in needs
        ref = reference if isinstance(reference, Features) else self.features(reference)
        if len(ref.nll_map) < 2:
            raise ValueError("a detector needs at least two reference images")
        self.reference_bpd = ref.bpd
        self.centre = float(self.reference_bpd.mean())
        bands = ref.bands()
        self.band_mean, self.band_std = bands.mean(0), bands.std(0).clamp_min(1e-6)
        self.reference_scores = {name: self._score(name, ref) for name in needs - {"combined"}}
        if score == "combined":
            fisher = sum(-torch.log(_leave_one_out_p(self.reference_scores[c])) for c in self.components)
            self.reference_scores["combined"] = fisher
        self.reference_score = self.reference_scores[score]

    @property
    def components(self) -> tuple[str, ...]:
        """The scores ``combined`` joins: ``combine`` if given, else ``COMBINED`` less the ratio
        without a background model."""
        if self._combine is not None:
            return self._combine
        return tuple(c for c in COMBINED if c != "ratio" or self.background is not None)

    def features(self, x: Tensor) -> Features:
        """The features this detector's score needs, of images x int64 [N, C, H, W]."""
        return features(self.model, x, background=self._background, codec=self._codec, flipped=self._flipped,
                        batch_size=self.batch_size, progress=self.progress)

    def _score(self, name: str, f: Features) -> Tensor:
        needed = {"ratio": f.background_bpd, "complexity": f.codec_bpd, "orientation": f.flipped_bpd}
        if name in needed and needed[name] is None:
            raise ValueError(f"these features lack what the {name} score needs: compute them with Detector.features")
        if name == "bpd":
            return f.bpd
        if name == "typicality":
            return (f.bpd - self.centre).abs()
        if name == "ratio":
            return f.bpd - f.background_bpd
        if name == "complexity":
            return f.bpd - f.codec_bpd
        if name == "orientation":
            return f.bpd - f.flipped_bpd
        if name == "local":
            return ((f.bands() - self.band_mean) / self.band_std).square().mean(1)
        fisher = sum(-torch.log(p_values(self._score(c, f), self.reference_scores[c])) for c in self.components)
        return torch.as_tensor(fisher, dtype=torch.float64)

    def score(self, x: Tensor | Features) -> Tensor:
        """The score of images x int64 [N, C, H, W] (or their ``Features``): float64 [N], higher = more atypical."""
        return self._score(self.score_name, x if isinstance(x, Features) else self.features(x))

    def p_values(self, x: Tensor | Features, score: Tensor | None = None) -> Tensor:
        """p-values of images x against the reference: [N] in (0, 1], small = atypical (``score``: if computed)."""
        return p_values(self.score(x) if score is None else score, self.reference_score)
