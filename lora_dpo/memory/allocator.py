"""The C allocator on a CPU: keep freed memory for the next tensor instead of returning it to the system.

glibc serves an allocation over its mmap threshold (at most 32 MiB by default) with fresh pages from the kernel
and gives them back when it is freed. A training step on the CPU allocates and frees hundreds of such tensors
(activations, logits chunks, gradients): every one is page-faulted in again and zeroed by the kernel. Measured on
SmolLM2-135M (benchmarks/RESULTS.md): a forward of 8 x 256 tokens took 317,758 page faults and 3.95 s, a training
step 684,652 faults and 11.4 s; with the thresholds raised, 4,728 faults and 3.60 s, 266,993 and 9.7 s (the step's
peak RSS rose from 7.6 to 8.5 GB: freed memory is kept for reuse). PyTorch's CPU allocator has no cache of its own
to switch on, hence mallopt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP = 1 << 30  # allocations under 1 GiB come from the heap, and up to 1 GiB of freed heap stays mapped


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (Linux with glibc; elsewhere nothing changes).
    Returns whether they were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP))
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
