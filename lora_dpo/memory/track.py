"""Peak tensor memory of a block of work, on a GPU or on the CPU.

On CUDA this is `torch.cuda.max_memory_allocated` (reset when the block starts). A CPU has no such counter, and
the process's peak RSS mixes the tensors with the Python interpreter and the libraries (about 1 GB before any
model exists). torch's profiler, asked to profile memory, reports every allocation and free of its CPU
allocator with its size; their running sum is the bytes of tensors alive, and its maximum is the CPU's
equivalent of `max_memory_allocated`: what the same work would hold on a device, give or take the kernels
that differ between the two (attention, dequantisation). Tests use it to pin what a memory lever saves, the
benchmark to compare peak tensor memory on a CPU, and both to check `lora-dpo plan`. `peak_memory_gb` is what
every metrics row reports.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass
class Peak:
    bytes: int = 0  # the peak of the whole block, filled in when the block ends
    device: str = "cpu"
    phases: dict = field(default_factory=dict)  # name -> peak bytes within that phase (see `mark`)
    _marks: list = field(default_factory=list)
    _anchors: dict = field(default_factory=dict)  # CPU: phase -> bytes of the tensors alive when it began

    def mark(self, name: str) -> None:
        """Start phase `name` here (the block starts in phase "start"): `phases[name]` will be the peak of the
        bytes alive from this point to the next mark, counting what was alive when it began."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.phases[self._marks[-1] if self._marks else "start"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._anchors[name] = live_tensor_bytes()
            with torch.profiler.record_function(f"{_MARK}{name}"):
                pass
        self._marks.append(name)


_MARK = "memtrack:"


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of every tensor Python can reach (parameters, buffers, quantisation
    states): what is alive between steps, when autograd holds nothing."""
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                    st = obj.untyped_storage()
                    storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, functional wrappers)
                continue
    return sum(storages.values())


def _cpu_peaks(prof, anchors: dict) -> tuple[int, dict]:
    """Largest running sum of the profiler's CPU memory events (allocations positive, frees negative), overall
    and per phase between marks. A phase begun by `mark` starts from the tensors then alive (`anchors`), not
    from the running sum: frees made on threads the profiler does not follow (a loader's worker threads) would
    otherwise stay counted as alive."""
    events = prof.profiler.kineto_results.events()
    marks = sorted((e.start_ns(), e.name()[len(_MARK):]) for e in events if e.name().startswith(_MARK))
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    bounds = [(0, "start")] + marks
    phases = {name: 0 for _, name in bounds}
    live = base = 0  # phase peak = base + (live - live when the phase began)
    k = 0
    for t, nbytes in memory:
        while k + 1 < len(bounds) and t >= bounds[k + 1][0]:
            k += 1
            base = anchors.get(bounds[k][1], live) - live
            phases[bounds[k][1]] = base + live
        live += nbytes
        phases[bounds[k][1]] = max(phases[bounds[k][1]], base + live)
    return max(phases.values()), phases


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """`with peak_memory(device) as p: ...` then `p.bytes`: the peak bytes of tensors allocated on `device`
    during the block. On CUDA it counts what was allocated before the block too (it is the allocator's peak);
    on the CPU it counts from the block's start (start it before the model loads to count the weights).
    `p.mark(name)` inside the block splits it into phases, whose peaks land in `p.phases`; on the CPU a phase
    begun by a mark counts every tensor alive in the process at that mark.

    Python's cyclic garbage collector is paused inside the block: collected at a random point of it, garbage
    from earlier work (tensors held by reference cycles) would be freed there and lower the measured peak by its
    size, so the same work would measure differently from one process to the next."""
    device = torch.device(device)
    result = Peak(device=device.type)
    collecting = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            yield result
            torch.cuda.synchronize(device)
            result.phases[result._marks[-1] if result._marks else "start"] = torch.cuda.max_memory_allocated(device)
            result.bytes = max(result.phases.values())
            return
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield result
        result.bytes, result.phases = _cpu_peaks(prof, result._anchors)
    finally:
        if collecting:
            gc.enable()


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors on CUDA; peak resident memory of the process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / (1e9 if sys.platform == "darwin" else 1e6)
