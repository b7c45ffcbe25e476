"""The benchmark: how fast deeprnn trains against PyTorch, measured in one run.

`cli` is `python -m deeprnn.bench` (flags, the table, the JSON); `rows` times one training step
of each implementation at each shape from the same parameters and batches; `seed_rows` times K
seeds vmapped and separate (the `seeds` config); `floor` is the reference row of the step's
matmuls alone; `profile` reads each row's top device ops back from a profiler trace
(`--profile`); `torch_peers` holds PyTorch's peers (nn.LSTM, cuDNN on a GPU) and d2l's recipe in
PyTorch; `end_to_end` times the book's recipe as whole processes. Measured results, with the
command, machine, date and commit of each, are in RESULTS.md.
"""
