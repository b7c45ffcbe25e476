"""`python -m deeprnn.train ARGS` with every file it writes capped at LIMIT bytes: a full disk,
for tests. Orbax writes through tensorstore (C++), not Python file objects, so the cap must
come from the kernel: `python tests/fsize_limited_train.py LIMIT ARGS...`."""

import resource
import runpy
import signal
import sys

limit = int(sys.argv[1])
# A write past the limit then fails with EFBIG, instead of SIGXFSZ killing the process.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["deeprnn.train", *sys.argv[2:]]
runpy.run_module("deeprnn.train", run_name="__main__", alter_sys=True)
