"""Peak tensor memory of a block of work, on a GPU or on the CPU.

On CUDA this is `torch.cuda.max_memory_allocated` (reset when the block starts). A CPU has no such counter, and
the process's peak RSS mixes the tensors with the Python interpreter and the libraries (about 1 GB before any
model exists). torch's profiler, asked to profile memory, reports every allocation and free of its CPU
allocator with its size; their running sum is the bytes of tensors alive, and its maximum is the CPU's
equivalent of `max_memory_allocated`: what the same work would hold on a device, give or take the kernels
that differ between the two (attention, dequantisation). Tests use it to pin what a memory lever saves, the
benchmark to compare peak tensor memory on a CPU, and both to check `lora-dpo plan`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Peak:
    bytes: int = 0  # the peak, filled in when the block ends
    device: str = "cpu"


def _cpu_peak(prof) -> int:
    """Largest running sum of the profiler's CPU memory events (allocations positive, frees negative)."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """`with peak_memory(device) as p: ...` then `p.bytes`: the peak bytes of tensors allocated on `device`
    during the block. On CUDA it counts what was allocated before the block too (it is the allocator's peak);
    on the CPU it counts from the block's start (start it before the model loads to count the weights)."""
    device = torch.device(device)
    result = Peak(device=device.type)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device)
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    result.bytes = _cpu_peak(prof)
