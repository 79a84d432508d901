"""Process-level settings for long runs: the device, and glibc's allocator.

With glibc's default (dynamic) mmap threshold, PyTorch's large CPU temporaries are mapped and
unmapped on every step, and the conv and attention models spent up to half their time in page
faults on our 2-core machine (see BENCHMARKS.md). ``configure_allocator`` pins the thresholds,
as ``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=134217728`` in the environment would;
the CLI calls it, library users may call it once at start-up.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_pinned = False


def configure_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Pin glibc's mmap and trim thresholds; returns False where that is not possible (not
    glibc, or PIXELCHAIN_DEFAULT_MALLOC is set). Safe to call more than once."""
    global _pinned
    if not sys.platform.startswith("linux") or os.environ.get("PIXELCHAIN_DEFAULT_MALLOC"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _pinned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False
    return _pinned


def allocator_pinned() -> bool:
    """Whether ``configure_allocator`` pinned the thresholds in this process."""
    return _pinned


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available (the local rank's GPU under torchrun), else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
