"""JAX process settings shared by the entry points."""

from __future__ import annotations

import os
import pathlib

import jax


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache, so a second run starts fast.

    The folder is `path`, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/deeprnn/jax (per user).
    """
    folder = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        pathlib.Path.home() / ".cache" / "deeprnn" / "jax")
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every compilation: the step functions here compile in 0.1-2 s each on a CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
