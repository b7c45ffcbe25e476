"""What a run records about itself in summary.json: flags, sizes, devices, versions, commit."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
import subprocess

import jax
import numpy as np

from deeprnn.model.build import count_params

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
             "tensorboardX", "numpy")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def git_commit() -> str:
    """The project's commit (with "+dirty" when the tree has changes), or "unknown"."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def baseline_perplexities(splits) -> dict[str, float]:
    """What a model must beat: uniform over the vocabulary, and a unigram model of the training
    text (add-one smoothed) scored on each held-out split."""
    out = {"uniform": float(splits.vocab.size)}
    counts = _token_counts(splits.train, splits.vocab.size) + 1.0
    log_probs = np.log(counts / counts.sum())
    for name in ("validation", "test"):
        ids = getattr(splits, name)
        if ids.size:
            total = _token_counts(ids, splits.vocab.size) @ log_probs  # sum of log p, per id
            out[f"unigram_{name}"] = float(np.exp(-total / ids.size))
    return out


def _token_counts(ids: np.ndarray, size: int, chunk: int = 1 << 22) -> np.ndarray:
    # In chunks: np.bincount copies its input to int64 first, 720 MB for text8's 90M ids.
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, len(ids), chunk):
        counts += np.bincount(ids[start: start + chunk], minlength=size)
    return counts


def run_metadata(config, model_config, params, splits, num_train_steps: int) -> dict:
    return {
        "flags": dataclasses.asdict(config),
        "num_params": count_params(params),
        "num_train_steps": num_train_steps,
        "baseline_perplexity": baseline_perplexities(splits),
        "vocab_size": splits.vocab.size,
        "corpus": {"documents": splits.documents, "unk_rate": splits.unk_rate,
                   "train_tokens": int(splits.train.size),
                   "validation_tokens": int(splits.validation.size),
                   "test_tokens": int(splits.test.size)},
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
        "process_count": jax.process_count(),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "steps_done": 0,
        "wall_time_s": 0.0,
        # From the start of training (data loaded, model built, compiled) to the end of this
        # process's first compiled call, and that call alone (compilation, or a read of the
        # compilation cache, plus its steps). tokens_per_sec leaves that call out.
        "startup_s": None,
        "first_call_s": None,
        "tokens_per_sec": 0.0,
    }
