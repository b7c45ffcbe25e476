"""Sweep launchers: `python -m launch.local` (this machine), `python -m launch.tpu` (Cloud TPU)."""
