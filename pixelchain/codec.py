"""Lossless compression with an exact-likelihood model: -log2 p(x) bits per image, plus a header.

    data = pc.compress("fmnist_pixelcnn_pp", x)      # x int64 [N, C, H, W] -> bytes
    x = pc.decompress(data)                           # the same levels, bit for bit

Coding runs the one decoding loop (``decode.decode``) with one more policy: the encoder's
(:class:`WriteToCoder`) passes each conditional to an entropy coder together with the image's
value and writes that value into the canvas; the decoder's (:class:`ReadFromCoder`) reads the
value from the coder instead. The entropy coder is ``constriction``'s range coder over categorical
models (``Categorical(perfect=False)``): it quantises each float64 table to integer frequencies
with at least one unit per value, deterministically, so encoder and decoder agree on the tables
exactly when they are given the same floats.

Same floats, by construction: the encoder does not use the teacher-forced pass (whose rounding
differs from the cached decoder's) but runs exactly the decoder's computation: the same cached
decoder, from the same all-zero canvas, written in the same order, on the same chunks of images
(the chunk size is recorded in the file, not taken from the caller), on the CPU with one intra-op
thread. Each chunk is its own range-coder stream. Floats can still differ between machines whose
kernels round differently (another CPU instruction set, another torch build): the file records a
CRC-32 of every chunk's images, so such a mismatch, like a wrong model, fails with an error
instead of returning wrong images.

The range coder (a queue) rather than ANS (a stack): the conditionals come in decoding order,
which is the order a queue decodes in, so the encoder codes each step as it is computed; ANS
decodes in reverse and would have to keep every step's tables of a chunk (784 x B x K floats).

Why constriction: it is maintained, ships wheels (Rust core), offers both range coding and ANS, and
codes a batch of symbols each with its own categorical table in one call, quantising float tables
itself. torchac (L3C's arithmetic coder) and craystack (numpy ANS for bits-back) are research code;
CompressAI's rANS serves its own indexed CDF tables and comes with that whole library.

File layout (version 1), all integers little-endian::

    MAGIC (8 bytes) | version u16 | header length u32 | header (JSON, UTF-8) |
    payload (the chunks' streams, uint32 words) | SHA-256 of everything before it (32 bytes)
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import struct
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint
from .decode import DimensionViews, decode
from .models.base import is_integer
from .runtime import intra_op_threads
from .score import eval_mode

MAGIC = b"PIXCHAIN"
VERSION = 1
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_DIGEST = 32  # bytes of the trailing SHA-256
DEFAULT_CHUNK = 256  # images per chunk: each chunk is decoded as one batch


def _constriction():
    """The constriction package, imported on first use (an optional dependency)."""
    try:
        return importlib.import_module("constriction")
    except ImportError:
        raise ImportError("compression needs the constriction package: pip install 'pixelchain[compress]' "
                          "(or pip install constriction)") from None


def probabilities(log_probs: Tensor) -> np.ndarray:
    """The float64 table [B, K] the coder quantises, from a conditional's log-probabilities [B, K]:
    one function for encoder and decoder. ValueError when a row is not a distribution."""
    table = log_probs.double().exp().numpy()
    if not np.isfinite(table).all() or not (table.sum(1) > 0).all():
        raise ValueError("a conditional distribution is NaN or has no probability mass: are the model's weights "
                         "finite?")
    return table


class WriteToCoder:
    """Encoder's policy: code ``x``'s value of each dimension with its conditional, and keep it."""

    def __init__(self, x: Tensor, encoder, family) -> None:
        self.x, self.encoder, self.family = DimensionViews(x.contiguous()), encoder, family

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        value = self.x(c, h, w)
        self.encoder.encode(value.numpy().astype(np.int32), self.family, probabilities(log_probs))
        return value


class ReadFromCoder:
    """Decoder's policy: each dimension's value is read from the coder, with its conditional."""

    def __init__(self, decoder, family) -> None:
        self.decoder, self.family = decoder, family

    def __call__(self, log_probs: Tensor, c: int, h: int, w: int) -> Tensor:
        return torch.from_numpy(self.decoder.decode(self.family, probabilities(log_probs)).astype(np.int64))


# ----------------------------------------------------------------------------- the model's identity
def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes and bytes of every tensor, by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: nn.Module, shipped: str | None) -> dict:
    """What the header records of the model: the shipped checkpoint's name when it is one, else its
    config (registered name and constructor arguments); the weights' SHA-256 always."""
    identity = {"shipped": shipped, "weights_sha256": weights_sha256(model)}
    if shipped is None:
        identity["config"] = {k: v for k, v in checkpoint.model_config(model).items() if k != "pixelchain_version"}
    return identity


def shipped_name(model: nn.Module) -> str | None:
    """The shipped checkpoint ``model`` is (same config, same weights), or None."""
    config, digest = checkpoint.model_config(model), None
    for name in checkpoint.pretrained():
        if checkpoint.read_config(name).get("model") != config["model"]:  # cheap: loads only the candidates
            continue
        shipped = checkpoint.load(name)
        digest = digest or weights_sha256(model)
        if checkpoint.model_config(shipped) == config and weights_sha256(shipped) == digest:
            return name
    return None


def resolve_model(model: nn.Module | str | Path) -> tuple[nn.Module, str | None]:
    """A density model on the CPU and the shipped name it goes by (None if it is not shipped)."""
    if isinstance(model, (str, Path)):
        name = str(model) if checkpoint.is_shipped(model) else None
        model = checkpoint.load(model)
    else:
        name = None
    if getattr(model, "kind", None) != "density":
        raise ValueError(f"{getattr(model, 'name', type(model).__name__)} is not a density model: only density "
                         "models compress")
    if model.num_classes is not None:
        raise ValueError(f"{model.name} is class-conditional: compression supports unconditional models only")
    if model.device.type != "cpu":  # coding runs on the CPU; the caller's model stays where it is
        model = copy.deepcopy(model).cpu()
    return model, name if name is not None else shipped_name(model)


# ----------------------------------------------------------------------------- coding
def _code_chunk(model: nn.Module, policy, count: int) -> Tensor:
    """Run the decoding loop on ``count`` images from an all-zero canvas, one thread, eval mode."""
    canvas = torch.zeros(count, *model.image_shape, dtype=torch.long)
    with intra_op_threads(1), eval_mode(model):
        return decode(model, canvas, policy)


def _crc(x: Tensor) -> int:
    return zlib.crc32(x.to(torch.int64).numpy().tobytes())


def compress(model: nn.Module | str | Path, x: Tensor, batch_size: int = DEFAULT_CHUNK,
             progress: bool = False) -> bytes:
    """Losslessly compress images x int64 [N, C, H, W] in [0, K) with ``model`` (a density model, a
    run directory or a shipped checkpoint's name): about -log2 p(x) bits per image plus a header.
    ``batch_size`` images are coded at a time (the chunk size, recorded in the file: memory grows
    with it, and so does throughput)."""
    constriction = _constriction()
    model, shipped = resolve_model(model)
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    x, _ = model.check_input(x.cpu() if isinstance(x, Tensor) else x)
    family = constriction.stream.model.Categorical(perfect=False)
    streams, chunks = [], []
    with tqdm(total=len(x), desc="compressing", unit="image", disable=not progress) as bar:
        for start in range(0, len(x), batch_size):
            part = x[start : start + batch_size]
            encoder = constriction.stream.queue.RangeEncoder()
            decoded = _code_chunk(model, WriteToCoder(part, encoder, family), len(part))
            if not torch.equal(decoded, part):
                raise AssertionError("the encoder's canvas differs from the images")  # a bug, not bad input
            words = encoder.get_compressed().astype("<u4")
            streams.append(words.tobytes())
            chunks.append([len(part), len(words), _crc(part)])
            bar.update(len(part))
    header = {
        "model": model_identity(model, shipped),
        "image_shape": list(model.image_shape),
        "num_levels": model.num_levels,
        "count": len(x),
        "chunk": int(batch_size),
        "chunks": chunks,
        "coder": f"constriction {metadata.version('constriction')} range coder, Categorical(perfect=False)",
        "torch": torch.__version__,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + b"".join(streams)
    return body + hashlib.sha256(body).digest()


def read_header(data: bytes) -> tuple[dict, bytes]:
    """The header and the payload of a compressed file's bytes; ValueError when they are not a
    complete, intact file of this format and version."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"expected the bytes of a compressed file, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size or not data.startswith(MAGIC):
        raise ValueError("not a pixelchain compressed file (its first bytes are not the format's signature)")
    _, version, length = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"compressed file of format version {version}; this pixelchain reads version {VERSION}")
    if len(data) < _PREFIX.size + length + _DIGEST:
        raise ValueError(f"the compressed file is truncated ({len(data)} bytes)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("the compressed file is corrupted or truncated (its SHA-256 checksum does not match)")
    try:
        header = json.loads(body[_PREFIX.size : _PREFIX.size + length])
        numbers = [*header["image_shape"], header["num_levels"], header["count"],
                   *(n for chunk in header["chunks"] for n in chunk)]
        if len(header["image_shape"]) != 3 or not all(isinstance(n, int) and n >= 0 for n in numbers):
            raise ValueError("sizes must be whole numbers >= 0")
        words = sum(n for _, n, _ in header["chunks"])
        count = sum(n for n, _, _ in header["chunks"])
        str(header["model"]["weights_sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the compressed file's header is malformed: {error}") from None
    payload = body[_PREFIX.size + length :]
    if len(payload) != 4 * words or count != header["count"]:
        raise ValueError("the compressed file's header does not match its payload")
    return header, payload


def load_model_for(header: dict, model: nn.Module | str | Path | None) -> nn.Module:
    """The model a file was compressed with: ``model`` when given (checked against the header's
    weights digest), else the shipped checkpoint the header names."""
    identity = header["model"]
    described = identity["shipped"] or "{} {}".format(identity.get("config", {}).get("model"),
                                                      identity.get("config", {}).get("args"))
    if model is None:
        if not identity["shipped"]:
            raise ValueError(f"the file was compressed with a model that is not shipped ({described}; weights "
                             f"sha256 {identity['weights_sha256'][:16]}...): pass that model (--model RUN_DIR)")
        if identity["shipped"] not in checkpoint.pretrained():
            raise ValueError(f"the file was compressed with the shipped model {identity['shipped']}, which this "
                             "pixelchain does not ship")
        model = identity["shipped"]
    model, _ = resolve_model(model)
    if weights_sha256(model) != identity["weights_sha256"]:
        raise ValueError(f"the file was compressed with another model ({described}; weights sha256 "
                         f"{identity['weights_sha256'][:16]}...), not this one")
    if list(model.image_shape) != header["image_shape"] or model.num_levels != header["num_levels"]:
        raise ValueError("the header's image shape or levels do not match the model's")
    return model


def decompress(data: bytes, model: nn.Module | str | Path | None = None, progress: bool = False) -> Tensor:
    """The images of a compressed file's bytes, int64 [N, C, H, W], exactly those compressed.
    ``model``: the model they were compressed with (default: the shipped checkpoint the file names).
    ValueError, never wrong images, when the file is damaged, of another format, or of another
    model."""
    constriction = _constriction()
    header, payload = read_header(data)
    model = load_model_for(header, model)
    family = constriction.stream.model.Categorical(perfect=False)
    images, offset = [], 0
    with tqdm(total=header["count"], desc="decompressing", unit="image", disable=not progress) as bar:
        for index, (count, words, crc) in enumerate(header["chunks"]):
            stream = np.frombuffer(payload, dtype="<u4", count=words, offset=offset).astype(np.uint32)
            offset += 4 * words
            decoder = constriction.stream.queue.RangeDecoder(stream)
            part = _code_chunk(model, ReadFromCoder(decoder, family), count)
            if _crc(part) != crc:
                raise ValueError(f"chunk {index}: the decoded images do not match the file's checksum: this "
                                 f"machine's arithmetic differs from the compressing one's (torch {header['torch']} "
                                 f"there, {torch.__version__} here) or the model does")
            images.append(part)
            bar.update(count)
    return torch.cat(images)


def payload_bits(data: bytes) -> tuple[int, int]:
    """(bits of the coded streams, bits of everything else: prefix, header and checksum)."""
    header, payload = read_header(data)
    return 8 * len(payload), 8 * (len(data) - len(payload))


def ideal_bits(model: nn.Module, x: Tensor, batch_size: int = DEFAULT_CHUNK) -> float:
    """sum of -log2 p(x) over the images (teacher-forced): what the payload approaches."""
    with eval_mode(model), torch.no_grad():
        nats = sum(float(model.log_prob(x[i : i + batch_size]).double().sum()) for i in range(0, len(x), batch_size))
    return -nats / math.log(2)
