"""Process-level settings: the device, glibc's allocator, bf16 support, and the intra-op thread policy.

With glibc's default (dynamic) mmap threshold, PyTorch's large CPU temporaries are mapped and
unmapped on every step, and every fresh mapping is paid for again in page faults: the conv and
attention models spent up to half their time in them on a 2-core CPU (see BENCHMARKS.md).
``configure_allocator`` pins the thresholds, as ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=2147483648`` in the environment would, so that tensors up to 1 GiB are
reused from the heap (the Gated PixelCNN at pytorch-generative's size has 100 MB activations; its
speed-up is in BENCHMARKS.md). The cost is that up to
2 GiB of freed memory stays with the process. The CLI calls it; library users may call it once
at start-up.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
# it. A cached decoding step's ops take microseconds, so decoding splits only ops far above that;
# a training or evaluation op of a million multiply-adds already takes long enough to gain from
# every core the process was given.
PARALLEL_WORK = 1 << 28
TRAIN_PARALLEL_WORK = 1 << 20

Task = Literal["train", "evaluate", "decode"]


class FreeCores:
    """How many cores other processes leave to this one, averaged over about the last ``interval``
    seconds (Linux: /proc/stat less this process's own CPU time; processes of a higher nice value
    count as free while this one runs at nice 0, since they yield to it). None where /proc is
    unavailable."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._reading: tuple[float, int, int, int] | None = None
        self._free: float | None = None

    @staticmethod
    def _read() -> tuple[float, int, int, int]:
        """(time, all ticks, ticks free for this process, this process's own ticks)."""
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, idle, iowait = ticks[:5]
        own = sum(int(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        free = idle + iowait + (nice if os.getpriority(os.PRIO_PROCESS, 0) <= 0 else 0)
        return time.monotonic(), sum(ticks), free, own

    def __call__(self) -> float | None:
        try:
            if self._reading is None:
                self._reading = self._read()
                time.sleep(0.05)
            if self._free is None or time.monotonic() - self._reading[0] >= self.interval:
                now = self._read()
                total, free, own = (now[i] - self._reading[i] for i in (1, 2, 3))
                if total > 0:
                    self._free = (os.cpu_count() or 1) * min(1.0, (free + own) / total)
                self._reading = now
        except (OSError, ValueError, IndexError, AttributeError):
            return None
        return self._free


@dataclass
class ThreadPolicy:
    """The one place that chooses the intra-op threads of the library's calls. A call of ``task``
    whose ops do about ``work`` multiply-adds each runs at one thread below the task's threshold.
    Above it, decoding runs at the process's setting (``torch.set_num_threads``); training and
    evaluation at that setting too, but no more threads than the cores other processes leave free
    (``free_cores``): a parallel op waits at its barrier for a thread that another process has
    descheduled, so beside other jobs a parallel step is several times slower than a serial one
    (BENCHMARKS.md). Change the thresholds on ``runtime.THREADS``."""

    train_work: float = TRAIN_PARALLEL_WORK
    decode_work: float = PARALLEL_WORK
    free_cores: Callable[[], float | None] = field(default_factory=FreeCores)

    def threads(self, task: Task, work: float, most: int | None = None) -> int:
        """Threads for ``task`` at ``work``; ``most`` is the process's setting (default: torch's now)."""
        if task not in ("train", "evaluate", "decode"):
            raise ValueError(f"unknown task {task!r}: train, evaluate or decode")
        limit = self.decode_work if task == "decode" else self.train_work
        if work < limit:
            return 1
        threads = most or torch.get_num_threads()
        free = None if task == "decode" or threads == 1 else self.free_cores()
        return threads if free is None else max(1, min(threads, round(free)))


THREADS = ThreadPolicy()


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


def threads_for(work: float, task: Task = "decode", most: int | None = None) -> int:
    """Intra-op threads for a ``task`` whose ops do about ``work`` multiply-adds each, at most
    ``most`` (default: torch's setting now); ``THREADS`` decides."""
    return THREADS.threads(task, work, most)


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
