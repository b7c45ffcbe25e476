"""Sweep definitions: one small module per sweep, loaded by `launch.sweep.load_sweep`.

A sweep module defines

    BASE_FLAGFILE = "experiments/<base>.flags"   # every run starts from this flagfile
    def runs():                                  # yields one entry per run
        yield run_name, {"flag": value, ...}                  # overrides of the flagfile
        yield run_name, {...}, {"eval_corpora": ["spec"]}     # optional run metadata

Run names become workdir names (SWEEP_DIR/run_name), so `tensorboard --logdir=SWEEP_DIR`
overlays every run. `eval_corpora` lists corpus specs that the launcher scores the trained run
on afterwards with `python -m deeprnn.evaluate --workdir=RUN --corpus=SPEC --split=test`.
"""
