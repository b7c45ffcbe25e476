"""Process settings shared by the programs: JAX's persistent compilation cache and the host
heap. jax is imported only inside `enable_compilation_cache`, so that the PyTorch side of the
benchmark can share the heap setting without importing it."""

from __future__ import annotations

import ctypes
import os
import pathlib


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache, so a second run starts fast.

    The folder is `path`, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/deeprnn/jax (per user).
    """
    import jax  # deferred: see the module docstring

    folder = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        pathlib.Path.home() / ".cache" / "deeprnn" / "jax")
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every compilation: the step functions here compile in 0.1-2 s each on a CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


# glibc's mallopt parameter number for M_TOP_PAD (malloc.h).
_M_TOP_PAD = -2
HOST_HEAP_PAD_BYTES = 256 << 20


def keep_freed_host_memory(pad_bytes: int = HOST_HEAP_PAD_BYTES) -> bool:
    """Asks glibc to keep up to pad_bytes of freed heap instead of returning it to the OS.

    XLA:CPU allocates every temporary of a step afresh (scan output buffers, activations), and
    with glibc's defaults the freed memory goes back to the kernel after each step, to be
    page-faulted in again by the next. On the 2-core CPU, a d2l-shape fused training step took
    about 1,030 minor page faults with the defaults and about 120 with the pad, and 42.5
    against 45 ms (medians of 6 alternating processes; the spread between runs is about as
    large). PyTorch's CPU steps gain more (torch-tight about 45 -> 34 ms), so the benchmark
    sets it in every process it times, PyTorch's included. Returns False (and changes nothing)
    where the C library is not glibc. Costs at most pad_bytes of resident memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_TOP_PAD, int(pad_bytes)))
    except (OSError, AttributeError):
        return False
