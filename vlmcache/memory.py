"""Peak memory of this process, and of one run in it."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    Linux's VmHWM belongs to the process's own address space. getrusage's ru_maxrss does not: it survives
    fork and execve, so a fresh child started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux and BSD


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise OSError("no VmRSS in /proc/self/status")


def reset_peak() -> None:
    """Start the peak (VmHWM) again from the current RSS (Linux 4.0+: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def start_peak_memory(device) -> str:
    """Reset the process's peak RSS (and the device's peak allocation), so that a run's peak is its own, not an
    earlier run's in the same process (ablate, tests). Returns what the recorded peak covers: "run", or
    "process" where the kernel cannot reset it."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    try:
        reset_peak()
    except OSError:
        return "process"
    return "run"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_heap_kept = False


def keep_heap() -> bool:
    """Keep freed memory in the heap instead of handing it back to the kernel (glibc only), for the CPU forward
    and backward passes of a tower (extraction, fine-tuning on CPU).

    With glibc's defaults, each large activation buffer of a ViT is a fresh mmap that is unmapped when freed,
    so every pass page-faults it in again, and how often depends on the process's history: identical encoder
    passes differ by up to a fifth. mallopt(M_MMAP_MAX, 0) and an unreachable trim threshold (what
    `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967295` set) reuse the same pages pass after pass; the
    process keeps its peak for good (glibc's dynamic thresholds cannot be restored), so the `extract` and
    `finetune` commands set it for their own process, the library never does. A user's own MALLOC_ settings
    are left as they are. Returns whether the setting is in force."""
    global _heap_kept
    if _heap_kept:
        return True
    if os.environ.get("MALLOC_MMAP_MAX_") is not None or os.environ.get("MALLOC_TRIM_THRESHOLD_") is not None:
        return False
    libc = _libc()
    if libc is None:
        return False
    _heap_kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _heap_kept


@functools.cache
def _libc():
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim; elsewhere nothing). Between the chunks
    of an evaluation, whose logits glibc would otherwise place on fresh heap pages chunk after chunk."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_heap_on_cpu(device: str) -> bool:
    """keep_heap() when `device` ("auto", "cpu", "cuda:1" ...) resolves to the CPU, where the tower's passes run."""
    from vlmcache.encoders import pick_device

    return pick_device(device).type == "cpu" and keep_heap()
