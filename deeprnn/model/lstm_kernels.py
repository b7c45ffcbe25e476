"""Which kernel runs the LSTM layers of `--impl=fused`: `--lstm_kernel=auto|fused|cudnn`.

    fused  deeprnn's own layer (fused_lstm.py, or the wavefront recurrence in fused.py)
    cudnn  cuDNN's LSTM through jax.experimental.rnn (cudnn_lstm.py): CUDA GPUs, float32
    auto   the winner of the nearest measured shape on this backend and dtype (MEASURED), and
           fused wherever nothing was measured; never cudnn off a GPU or outside float32

"Nearest" is by the size of one time step's recurrent matmul, B x H x 4H: it decides whether a
step is bound by latency (small steps, where fused's hoisting, unrolling and steps per call
pay) or by throughput (large steps, where cuDNN's fused cell kernels win). The table holds what
has been measured and where; `bash launch/gpu_bench.sh` times both kernels at the d2l, mid and
big shapes, and its rows are what to add here.
"""

from __future__ import annotations

import dataclasses
import math

from deeprnn.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Measured:
    backend: str  # jax.default_backend(): "gpu", "cpu", "tpu"
    dtype: str  # compute dtype
    hidden: int
    layers: int
    batch: int  # per device
    steps: int
    winner: str  # "fused" | "cudnn"
    where: str  # machine, versions, command and numbers

    @property
    def step_size(self) -> int:
        return self.batch * self.hidden * 4 * self.hidden


MEASURED = (
    Measured("gpu", "float32", 256, 2, 32, 35, "fused",
             "H200, jax 0.11.2 (first session, before fused_lstm.py): deeprnn.bench fused "
             "1.66 ms/step (TF32 off); jax.experimental.rnn.lstm in a hand-written jitted step "
             "4.7 ms (DESIGN.md, peers table)"),
    Measured("gpu", "float32", 1024, 4, 256, 128, "cudnn",
             "H200: deeprnn.bench fused 162.4 ms/step vs PyTorch cuDNN 130.9 (TF32 off, first "
             "session); jax.experimental.rnn.lstm 37.9 ms vs a hand hoisted JAX scan 53 ms, "
             "each library's default precision (an independent run, issue 17)"),
)


def check_backend(requested: str, backend: str) -> None:
    """UsageError for --lstm_kernel=cudnn off a GPU (before a run touches its workdir)."""
    if requested == "cudnn" and backend != "gpu":
        raise UsageError(f"--lstm_kernel=cudnn needs a CUDA GPU (jax.experimental.rnn has no "
                         f"{backend} lowering); use --lstm_kernel=auto or fused")


def choose_lstm_kernel(requested: str, *, backend: str, dtype: str, hidden: int, batch: int,
                       table=MEASURED) -> str:
    """The kernel for `requested` ("auto" | "fused" | "cudnn") on this backend and shape."""
    if requested != "auto":
        return requested
    if backend != "gpu" or dtype != "float32":
        return "fused"  # the binding has no CPU/TPU lowering and takes float32 only
    candidates = [m for m in table if m.backend == backend and m.dtype == dtype]
    if not candidates:
        return "fused"
    size = math.log(batch * hidden * 4 * hidden)
    return min(candidates, key=lambda m: abs(math.log(m.step_size) - size)).winner
