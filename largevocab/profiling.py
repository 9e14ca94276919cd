"""Peak-memory measurement used by the demo and the benchmarks (CUDA allocator or the process's RSS on Linux)."""

from __future__ import annotations

import os
import platform
import resource

import torch

# glibc returns a freed block to the OS only above its mmap threshold, and raises that threshold after each large
# free, so freed tensors stay in the resident set and later ones reuse them: the RSS-based CPU peak then depends on
# what ran before (observed: 0-34 MiB for the same SCE step). A fixed threshold (which disables the adjustment)
# and an immediate trim make RSS track live tensor bytes. glibc reads these at start-up, so they apply to a child
# process started with them (benchmarks/harness.run_worker does).
STABLE_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets this process's high-water mark (VmHWM), Linux >= 4.0.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: str | torch.device = "cpu") -> str:
    """A human name for result files: the GPU's name, or the CPU model and its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.extra_bytes``: the peak above what was held on entry.

    On CUDA this is the caching allocator's peak; on CPU the process's peak resident set, so run one measured thing
    per process, started with ``STABLE_RSS_ENV`` in its environment, for a repeatable number.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.extra_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = _rss_bytes()
            _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _peak_rss_bytes()
        self.extra_bytes = max(0, peak - self._base)


def live_tensor_peak_bytes(fn, device: str | torch.device = "cpu") -> int:
    """Peak bytes of tensors allocated and alive at once while ``fn()`` runs, above what was live before it.

    On CUDA the caching allocator's peak (as :class:`PeakMemory`); on CPU the torch profiler's allocation and free
    events of every tensor, summed in time order: independent of the allocator and of what ran before in the
    process (the RSS peak is not: freed heap pages are reused), so it can be measured inside a training process.
    """
    device = torch.device(device)
    if device.type == "cuda":
        with PeakMemory(device) as peak:
            fn()
        return peak.extra_bytes
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak

