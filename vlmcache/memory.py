"""Peak memory of this process, and of one run in it."""

from __future__ import annotations

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
