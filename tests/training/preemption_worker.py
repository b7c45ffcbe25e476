"""One of two processes that must agree on the step where a preemption stops them.

    python tests/preemption_worker.py ADDRESS PROCESS_ID CHECKPOINT_DIR

Both run a stand-in training loop (no model: the agreement is what is tested) with the
trainer's StopSignals and RunCheckpoints; a signal to either process stops both at the same
step, and both take part in saving that step. Prints `running` once going, then `stopped STEP`.
"""

import sys
import time

import jax
import numpy as np

from deeprnn.run.checkpoints import RunCheckpoints
from deeprnn.run.lifecycle import StopSignals
from deeprnn.training.parallel import start_multihost

address, process_id, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start_multihost(True, address, 2, process_id)
store = RunCheckpoints(directory, max_to_keep=None)
with StopSignals(multihost=jax.process_count() > 1) as stop:
    step = 0
    while True:
        time.sleep(0.02)  # a training step
        step += 1
        if step == 10:
            print("running", flush=True)
        if stop.should_stop(step, store):
            store.save(step, {"step": np.asarray(step)}, {"step": step}, wait=True)
            print(f"stopped {step}", flush=True)
            break
store.close()
jax.distributed.shutdown()
