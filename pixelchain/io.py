"""Reading the images users have: image files of any format Pillow reads (``.png``, ``.PNG``,
``.jpg``, ``.tif``, ...), folders of them, ``.npy`` / ``.npz`` arrays, and dataset splits
``NAME:SPLIT[A:B]``; anything else is refused by name.

An image file's levels are its depth: 1-bit images 2, 8-bit 256, 16-bit greyscale 65536 (Pillow
reads 16-bit colour PNGs at 8 bits). Colour becomes grey by Pillow's luminance (``convert("L")``),
grey becomes colour by repeating the channel. Pixel counts are checked against Pillow's limit
before decoding (a decompression bomb is an error) and the total against free memory. An array
holds levels already: ``.npy`` integers [N, C, H, W] or [N, H, W]; ``.npz`` the same as
``images``, with optional ``labels`` [N] and ``num_levels``. Arrays are never unpickled and their
headers are checked against the file's size before anything is read.

What a run records of its data (``dataset_record``: a built-in dataset's name, or the user's images
with their path and count) and the splits that record gives back (``load_split``) live here too,
for the command line and the benchmarks alike.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import data
from .runtime import check_fits

Image.init()
IMAGE_SUFFIXES = frozenset(ext.lower() for ext in Image.registered_extensions())
ARRAY_SUFFIXES = (".npy", ".npz")
_EIGHT_BIT = {"L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` (any case of suffix), sorted by name; ValueError if none."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise ValueError(f"{folder}: no image files in the folder (suffixes Pillow reads, e.g. .png .jpg .tif)")
    return files


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily, its size checked against Pillow's pixel limit before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: too many pixels to read safely ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: not an image Pillow can read ({error})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ValueError(f"{path}: {image.width}x{image.height} pixels, more than the {limit:,} read safely")
    return image


def _depth(image: Image.Image, path: Path) -> tuple[int, int]:
    """(levels, channels) of an opened image, or ValueError naming a mode that is not levels."""
    if image.mode == "1":
        return 2, 1
    if image.mode.startswith("I;16") or image.mode == "I":
        return 65536, 1
    if image.mode in _EIGHT_BIT:
        return 256, 1 if image.mode in ("L", "LA", "La") else 3
    raise ValueError(f"{path}: pixel mode {image.mode!r} (e.g. floating point) is not integer levels")


def _pixels(image: Image.Image, path: Path, levels: int, channels: int, resize: tuple[int, int] | None) -> np.ndarray:
    """An opened image as an integer array [channels, H, W] in [0, levels)."""
    if resize is not None and image.size != (resize[1], resize[0]):
        nearest = image.mode == "1" or levels == 65536
        image = image.resize((resize[1], resize[0]), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    if levels == 2:
        array = np.asarray(image.convert("1"), dtype=np.uint8)
    elif levels == 65536:
        array = np.asarray(image).astype(np.int64)
        if array.min() < 0 or array.max() >= 65536:
            raise ValueError(f"{path}: 32-bit integer pixels beyond 16 bits ([{array.min()}, {array.max()}])")
        array = array.astype(np.uint16)
    else:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    if array.ndim == 2:
        return np.repeat(array[None], channels, 0)
    return array.transpose(2, 0, 1)


def read_image_files(files: list[Path], channels: int | None = None,
                     resize: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """Images [N, C, H, W] (uint8 or uint16) and their levels from image ``files``. ``channels``
    None: 3 if any file is in colour, else 1. Files of different depths, or of different sizes
    without ``resize`` (H, W), are refused naming two of them."""
    headers = []
    for path in files:
        with _open(path) as image:
            headers.append((path, *_depth(image, path), image.size))
    depths = {levels for _, levels, _, _ in headers}
    if len(depths) > 1:
        a, b = (next(h for h in headers if h[1] == d) for d in sorted(depths)[:2])
        raise ValueError(f"{a[0].name} has {a[1]} levels, {b[0].name} {b[1]}: convert them to one bit depth")
    levels = depths.pop()
    channels = channels or max(c for _, _, c, _ in headers)
    if levels == 65536 and channels == 3:
        raise ValueError(f"{files[0]}: 16-bit greyscale images for a colour model; read them as grey")
    sizes = {size for *_, size in headers}
    if len(sizes) > 1 and resize is None:
        a, b = (next(h for h in headers if h[3] == s) for s in list(sizes)[:2])
        raise ValueError(f"{a[0].name} is {a[3][0]}x{a[3][1]}, {b[0].name} {b[3][0]}x{b[3][1]}: images of "
                         "different sizes; resize them, or pass --resize HxW (resize= in Python)")
    W, H = (resize[1], resize[0]) if resize else sizes.pop()
    check_fits(len(files) * channels * H * W * 8, f"{len(files)} images of {channels}x{H}x{W}")
    arrays = []
    for path in files:
        with _open(path) as image:
            arrays.append(_pixels(image, path, levels, channels, resize))
    return np.stack(arrays), levels


def _check_npy_header(handle, path: Path, size: int) -> None:
    """ValueError unless the .npy header at ``handle`` describes integers that the ``size`` bytes
    left in the file can hold (a crafted header never reaches an allocation)."""
    fmt = np.lib.format
    try:
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(handle))
        if read is None:
            raise ValueError("a .npy format version this reader does not take")
        shape, _, dtype = read(handle)  # headers over 10,000 bytes are refused
    except (ValueError, OSError, SyntaxError, TypeError, RecursionError, MemoryError) as error:
        raise ValueError(f"{path}: not a .npy array ({error})") from None
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{path}: must hold integers, got dtype {dtype}")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > size:
        raise ValueError(f"{path}: its header describes {list(shape)} {dtype} ({need:,} bytes), more than the file "
                         f"holds: truncated or crafted")


def _load_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        _check_npy_header(f, path, path.stat().st_size)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from None


def count_images(path: Path) -> int:
    """How many images a folder, an image file or an array file holds (arrays: their header's N)."""
    if path.is_dir():
        return len(image_files(path))
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        return 1
    return len(read_array(path)[0])


def read_integers(path: Path, what: str) -> np.ndarray:
    """A .npy array of integers (``what`` names it in errors); never unpickles."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    return _load_npy(path)


def read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(images [N, C, H, W], labels [N] or None, num_levels or None) of a .npy or .npz file."""
    labels, levels = None, None
    if path.suffix.lower() == ".npy":
        images = read_integers(path, "images")
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                members = {Path(n).stem: n for n in archive.namelist() if n.endswith(".npy")}
                if "images" not in members:
                    raise ValueError(f"{path}: an .npz needs an 'images' array (it holds {sorted(members)})")
                arrays = {}
                for key in ("images", "labels", "num_levels"):
                    if key in members:
                        info = archive.getinfo(members[key])
                        with archive.open(info) as f:
                            _check_npy_header(f, path / key, info.file_size)
                        with archive.open(info) as f:
                            arrays[key] = np.load(f, allow_pickle=False)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(f"{path}: not a readable .npz archive ({error})") from None
        images, labels = arrays["images"], arrays.get("labels")
        if "num_levels" in arrays:
            levels = arrays["num_levels"]
            if levels.shape != () or not 2 <= int(levels) <= 65536:
                raise ValueError(f"{path}: num_levels must be one integer in [2, 65536], got {levels.tolist()!r:.60}")
            levels = int(levels)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or 0 in images.shape:
        raise ValueError(f"{path}: images must be integers [N, C, H, W] (C 1 or 3) or [N, H, W], got "
                         f"{list(images.shape)}")
    if images.min() < 0:
        raise ValueError(f"{path}: negative values ({images.min()}); levels are integers >= 0")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"{path}: labels must be [{len(images)}], got {list(labels.shape)}")
    return images, labels, levels


def read_images_and_levels(spec: str, channels: int) -> tuple[torch.Tensor, int | None]:
    """Images int64 [N, C, H, W] from ``spec`` as they are, and the levels they come in (None when
    unknown): a dataset split ``NAME:SPLIT`` or ``NAME:SPLIT[A:B]`` (e.g. ``fashion_mnist:test[:1000]``;
    the dataset's levels), a ``.npy`` of integer levels (unknown) or ``.npz`` (its ``num_levels``,
    if any), an image file or a folder of images (sorted by name; grey when ``channels`` is 1, else
    colour; their bit depth)."""
    path = Path(spec)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        images, _, levels = read_array(path)
        return torch.from_numpy(images.astype(np.int64)), levels
    if path.is_dir() or (path.is_file() and is_image_file(path)):
        array, levels = read_image_files(image_files(path) if path.is_dir() else [path], channels)
        return torch.from_numpy(array.astype(np.int64)), levels
    split, rows = dataset_split(spec)
    return split.images[rows], split.num_levels


def read_images(spec: str, channels: int) -> torch.Tensor:
    """The images of :func:`read_images_and_levels`, unmapped (what ``compress`` codes losslessly)."""
    return read_images_and_levels(spec, channels)[0]


def source_levels(x: torch.Tensor) -> int:
    """The levels integer images of unknown depth come in, judged by their largest value: 2 (0/1),
    256 (8-bit) or 65536 (16-bit)."""
    top = int(x.max()) if x.numel() else 0
    for levels in (2, 256, 65536):
        if top < levels:
            return levels
    raise ValueError(f"image values up to {top}: expected 8- or 16-bit levels")


def read_model_images(spec: str, channels: int, levels: int, num_levels: int | None = None,
                      binarize: str | None = None) -> torch.Tensor:
    """IMAGES in a model's ``levels``: the one rule of every command that scores, completes,
    attacks, detects or purifies images.

    * ``num_levels`` / ``binarize`` (``--num-levels``, ``--binarize``) given: the images are mapped
      from the levels they come in as ``train`` maps a dataset; the result must have ``levels``.
    * Else images whose levels are known (a dataset split, an image file's depth, an ``.npz`` with
      ``num_levels``) and deeper than the model's are quantised as ``--num-levels LEVELS`` would,
      floor(x * levels / theirs) (for 2 levels: x >= half, the threshold binarisation); shallower
      ones are refused.
    * Else (a ``.npy``, or images in the model's levels) they are the model's levels as they are,
      and a value at or above ``levels`` is refused, naming the flag that maps it.
    """
    x, known = read_images_and_levels(spec, channels)
    if num_levels is not None or binarize is not None:
        mapped = data.transform(data.ImageDataset(x, known or source_levels(x)), num_levels, binarize)
        if mapped.num_levels != levels:
            hint = f"--num-levels {levels}" + (" or --binarize threshold" if levels == 2 else "")
            raise ValueError(f"{spec}: the mapped images have {mapped.num_levels} levels but the model takes "
                             f"{levels}: pass {hint}")
        return mapped.images
    if known is not None and known > levels:
        return data.quantize(x, known, levels)
    if known is not None and known < levels:
        raise ValueError(f"{spec}: images of {known} levels for a model of {levels}; give images of at least "
                         f"{levels} levels")
    top = int(x.max()) if x.numel() else 0
    if top >= levels:
        hint = "--binarize threshold (or dynamic)" if levels == 2 else f"--num-levels {levels}"
        raise ValueError(f"{spec}: values reach {top} but the model takes {levels} levels: pass {hint} to map "
                         f"them from {source_levels(x)} levels as training does (or save an .npz with num_levels)")
    return x


def read_labels(spec: str, labels: str | None, count: int) -> torch.Tensor:
    """int64 [count] labels of the images ``spec``: from ``labels`` (a .npy of integers [N]) when
    given, else the labels of a dataset split ``NAME:SPLIT[A:B]`` or of an .npz's ``labels``."""
    if labels is not None:
        y = torch.from_numpy(read_integers(Path(labels), "labels").astype(np.int64))
        where = labels
    elif Path(spec).suffix.lower() == ".npz" and read_array(Path(spec))[1] is not None:
        y, where = torch.from_numpy(read_array(Path(spec))[1].astype(np.int64)), spec
    elif Path(spec).suffix.lower() in ARRAY_SUFFIXES or Path(spec).exists():
        raise ValueError(f"{spec} carries no labels: pass --labels FILE.npy (integers [N])")
    else:
        split, rows = dataset_split(spec)
        if split.labels is None:
            raise ValueError(f"{spec}: this dataset has no labels")
        y, where = split.labels[rows], spec
    if y.shape != (count,):
        raise ValueError(f"{where}: expected labels of shape [{count}] (one per image), got {list(y.shape)}")
    return y


def dataset_split(spec: str) -> tuple[data.ImageDataset, slice]:
    """``NAME:SPLIT[A:B]`` -> the split and the slice of its rows."""
    match = re.fullmatch(r"(\w+):([\w+]+)(?:\[(-?\d*):(-?\d*)\])?", spec)
    if not match:
        raise ValueError(f"{spec!r} is not an image file or folder, a .npy/.npz file, or NAME:SPLIT[A:B]")
    name, split, a, b = match.groups()
    return data.load(name, split), slice(int(a) if a else None, int(b) if b else None)


def dataset_record(spec: str, num_levels: int | None = None, binarize: str | None = None, grey: bool | None = None,
                   resize: str | None = None) -> dict:
    """What a run records of its data: a built-in dataset's name, or the user's images (a folder,
    an image file, a .npy/.npz: ``data.from_images``) with their path and how many there were."""
    if spec in data.list_datasets():
        if grey or resize:
            raise ValueError(f"--grey and --resize apply to your own images, not to the built-in {spec}")
        return {"name": spec, "num_levels": num_levels, "binarize": binarize}
    path = Path(spec)
    if not path.is_dir() and not path.is_file():
        raise ValueError(f"--dataset {spec!r}: not a built-in dataset ({', '.join(data.list_datasets())}) nor a "
                         "folder of images, an image file or a .npy/.npz")
    size = None
    if resize is not None:
        match = re.fullmatch(r"(\d+)x(\d+)", resize)
        if not match or 0 in (size := [int(match[1]), int(match[2])]):
            raise ValueError(f"--resize expects HxW (e.g. 32x32), got {resize!r}")
    record = {"name": path.stem, "path": str(path.resolve()), "num_levels": num_levels, "binarize": binarize,
              "grey": grey, "resize": size}
    record["images"] = count_images(path)
    return record


def load_split(dataset: dict, split: str) -> data.ImageDataset:
    """``split`` of a dataset a run recorded (``dataset_record``)."""
    options = {"num_levels": dataset.get("num_levels"), "binarize": dataset.get("binarize")}
    if dataset.get("path") is None:
        return data.load(dataset["name"], split, **options)
    total = count_images(Path(dataset["path"]))
    if dataset.get("images") not in (None, total):
        raise ValueError(f"{dataset['path']} now holds {total} images, the run's {dataset['images']}: its splits "
                         "would differ; restore the data or start a new run")
    resize = dataset.get("resize")
    return data.from_images(dataset["path"], split, grey=dataset.get("grey"), resize=resize and tuple(resize),
                            **options)
