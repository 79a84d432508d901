"""Process-level settings: the device, glibc's allocator, and intra-op threads by work size.

With glibc's default (dynamic) mmap threshold, PyTorch's large CPU temporaries are mapped and
unmapped on every step, and every fresh mapping is paid for again in page faults: the conv and
attention models spent up to half their time in them on a 2-core CPU (see BENCHMARKS.md).
``configure_allocator`` pins the thresholds, as ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=2147483648`` in the environment would, so that tensors up to 1 GiB are
reused from the heap: the Gated PixelCNN at pytorch-generative's size (128 channels, batch 128:
100 MB activations) trained ~1.5x faster than with a 64 MiB threshold. The cost is that up to
2 GiB of freed memory stays with the process. The CLI calls it; library users may call it once
at start-up.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_pinned: tuple[int, int] | None = None


def configure_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 2 << 30) -> bool:
    """Pin glibc's mmap and trim thresholds (bytes); returns False where that is not possible (not
    glibc, or PIXELCHAIN_DEFAULT_MALLOC is set). Safe to call more than once."""
    global _pinned
    if not sys.platform.startswith("linux") or os.environ.get("PIXELCHAIN_DEFAULT_MALLOC"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False
    _pinned = (mmap_threshold, trim_threshold) if ok else None
    return ok


def allocator_pinned() -> tuple[int, int] | None:
    """The (mmap, trim) thresholds ``configure_allocator`` pinned in this process, or None."""
    return _pinned


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available (the local rank's GPU under torchrun), else cpu. ValueError for
    a name torch does not know or a device this machine does not have."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device (torch {torch.__version__})")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# Multiply-adds per operation below which extra intra-op threads cost more than they give. Every
# parallel op ends at a barrier where each thread waits for the slowest: when another process holds
# a core, one of our threads is descheduled for a time slice (milliseconds) and the op waits for
# it. Cached sampling of a small PixelCNN took 0.88 s at 2 threads with one busy core and 41 s with
# two other jobs running, against 0.31-0.37 s at 1 thread (issue 13). Above this size an op runs
# long enough that splitting it pays even then.
PARALLEL_WORK = 1 << 28


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively on ``device``: CUDA, or a CPU with AVX512-BF16 / AMX
    (elsewhere the CPU emulates bf16 and autocast is slower than fp32)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def threads_for(work: float) -> int:
    """Intra-op threads for ops of about ``work`` multiply-adds each: 1 below PARALLEL_WORK, else
    the process's setting (``torch.set_num_threads``)."""
    return 1 if work < PARALLEL_WORK else torch.get_num_threads()


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads; the previous setting is restored afterwards
    (also when the block raises)."""
    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated on ``device``: the GPU's free memory, or the host's
    MemAvailable (Linux; else the free physical pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(nbytes: int, what: str, device: torch.device | str = "cpu") -> None:
    """ValueError naming ``what`` when ``nbytes`` exceed what ``device`` has free: checked before
    allocating, so a size the memory cannot hold is an error, not an allocator's traceback."""
    free = available_memory(device)
    if nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
                         f"{torch.device(device).type}; ask for less")
