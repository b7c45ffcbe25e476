"""Test session setup: one JAX compilation cache shared by this process and its subprocesses."""

import os
import pathlib

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache" / "tests"
_CACHE.mkdir(parents=True, exist_ok=True)
# Environment variables reach the subprocesses that tests start (python -m deeprnn.train ...).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

SHARED_CORPORA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "corpora"
