"""The PyTorch peers of the benchmark: nn.LSTM / nn.GRU / nn.RNN (cuDNN on a GPU).

    torch-d2l-loop  driven as d2l's train_ch8 drives it: batches moved to the device one at a
                    time, one-hot input, a `.item()`-style host sync per batch (the loss
                    accumulator), clipping by a Python loop over the parameters
    torch-tight     the same model and optimizer without host syncs: data resident on the device,
                    torch.nn.utils.clip_grad_norm_ (no sync), losses kept as tensors

Both start from deeprnn's initial parameters (mapped below), so after k identical steps on the
same batches their loss equals the JAX rows' loss: the proof that the rows do the same work.
Imported only when torch is installed (`pip install .[bench]`). `python -m
deeprnn.bench.torch_peers --text=PATH` runs d2l's recipe end to end (for end_to_end.py).
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import sys
import time

import numpy as np
import torch
from absl import flags
from torch import nn

from deeprnn.errors import UsageError, exit_on_usage_error, parse_argv
from deeprnn.run.process import keep_freed_host_memory


class TorchRNNLM(nn.Module):
    """d2l's RNNModel: a torch recurrent stack over one-hot inputs, then a linear layer."""

    def __init__(self, cell: str, vocab_size: int, hidden: int, layers: int, activation="tanh"):
        super().__init__()
        self.vocab_size = vocab_size
        if cell == "lstm":
            self.rnn = nn.LSTM(vocab_size, hidden, layers)
        elif cell == "gru":
            self.rnn = nn.GRU(vocab_size, hidden, layers)
        else:
            self.rnn = nn.RNN(vocab_size, hidden, layers, nonlinearity=activation)
        self.linear = nn.Linear(hidden, vocab_size)

    def forward(self, inputs):
        x = nn.functional.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
        y, state = self.rnn(x)  # no state given: zeros, as d2l's begin_state for random batches
        return self.linear(y.reshape(-1, y.shape[-1])), state


def load_scratch_params(model: TorchRNNLM, params, cell: str) -> None:
    """Copies deeprnn's scratch parameters into the torch model (same gate orders: lstm i,f,g,o;
    gru r,z,n with b_hn as torch's recurrent n-gate bias).

    torch keeps two biases per layer (input and recurrent) where deeprnn keeps one; training
    both would move the sum twice as far per SGD step and count it twice in the clipping norm.
    So the recurrent bias is frozen at zero (for gru, all but its n block, which is b_hn).
    """
    tree = params["params"]
    hidden = model.rnn.hidden_size
    with torch.no_grad():
        for index in range(model.rnn.num_layers):
            layer = {k: np.array(v) for k, v in tree[f"layer_{index}"].items()}
            getattr(model.rnn, f"weight_ih_l{index}").copy_(torch.from_numpy(layer["W_x"].T.copy()))
            getattr(model.rnn, f"weight_hh_l{index}").copy_(torch.from_numpy(layer["W_h"].T.copy()))
            getattr(model.rnn, f"bias_ih_l{index}").copy_(torch.from_numpy(layer["b"]))
            recurrent_bias = np.zeros_like(layer["b"])
            if cell == "gru":
                recurrent_bias[2 * hidden:] = layer["b_hn"]
            bias_hh = getattr(model.rnn, f"bias_hh_l{index}")
            bias_hh.copy_(torch.from_numpy(recurrent_bias))
            if cell == "gru":
                keep = torch.zeros_like(bias_hh)
                keep[2 * hidden:] = 1.0
                bias_hh.register_hook(lambda grad, keep=keep: grad * keep)
            else:
                bias_hh.requires_grad_(False)
        model.linear.weight.copy_(torch.from_numpy(np.asarray(tree["output"]["kernel"]).T.copy()))
        model.linear.bias.copy_(torch.from_numpy(np.array(tree["output"]["bias"])))


def _d2l_grad_clipping(net, theta):
    """d2l.grad_clipping, verbatim in effect: a Python loop and a host-side comparison."""
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def set_threads(threads: int) -> None:
    """torch's CPU threads; 0 keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def set_precision(allow_tf32: tuple[bool, bool] | None) -> str:
    """TF32 for torch's (matmuls, cuDNN), or None to keep torch's defaults (matmuls float32,
    cuDNN TF32); returns precision_label()."""
    if allow_tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow_tf32
    return precision_label()


def precision_label() -> str:
    """What torch's float32 matmuls and cuDNN RNNs run as on this device."""
    if not torch.cuda.is_available():
        return "float32"
    matmul = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "float32"
    cudnn = "tf32" if torch.backends.cudnn.allow_tf32 else "float32"
    return matmul if matmul == cudnn else f"matmul {matmul}, cuDNN {cudnn}"


def prepare_torch(style: str, shape, params, xs: np.ndarray, ys: np.ndarray, *, dtype: str,
                  lr: float, clip: float, k: int, steps: int):
    """One torch row, warmed up: (facts, time_repeat). xs, ys int32 [P, B, T] host batches
    (cycled). time_repeat() runs `steps` more steps and returns seconds per step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # This row's own memory: the other rows of the run may hold theirs on the same device.
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    model = TorchRNNLM(shape.cell, shape.vocab, shape.hidden, shape.layers).to(device)
    load_scratch_params(model, params, shape.cell)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    resident_x = torch.from_numpy(xs).to(device)
    resident_y = torch.from_numpy(ys).to(device)
    sums = []

    def d2l_step(i):
        # d2l's iterator yields host tensors; train_epoch_ch8 moves each batch to the device.
        x = torch.from_numpy(xs[i % len(xs)]).to(device)
        y = torch.from_numpy(ys[i % len(ys)]).to(device)
        with autocast:
            y_hat, _ = model(x)
            loss = loss_fn(y_hat, y.T.reshape(-1).long()).mean()
        optimizer.zero_grad()
        loss.backward()
        _d2l_grad_clipping(model, clip)
        optimizer.step()
        sums.append(float(loss.detach() * y.numel()))  # d2l's Accumulator: a host sync every batch
        return sums[-1] / y.numel()

    def tight_step(i):
        x, y = resident_x[i % len(xs)], resident_y[i % len(ys)]
        with autocast:
            y_hat, _ = model(x)
            loss = loss_fn(y_hat, y.T.reshape(-1).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()
        sums.append(loss.detach())
        return loss.detach()

    step = d2l_step if style == "d2l-loop" else tight_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss_k = None
    for i in range(k):  # the loss check doubles as warm-up (cuDNN plans, allocator)
        loss_k = step(i)
    _sync(device)
    warmup_s = time.perf_counter() - start
    facts = {
        "compile_s": warmup_s,
        "peak_mem_bytes": (int(torch.cuda.max_memory_allocated()) - before
                           if device.type == "cuda" else None),
        "loss_after_k": float(loss_k),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    done = k

    def time_repeat() -> float:
        nonlocal done
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step(done + i)
        _sync(device)
        done += steps
        return (time.perf_counter() - start) / steps

    return facts, time_repeat


def profile_steps(time_repeat, directory) -> str:
    """One more repeat of a torch row under torch.profiler; returns its Chrome trace's path
    (deeprnn.bench.profile reads the table back from it)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        time_repeat()
    path = f"{directory}/trace.json"
    prof.export_chrome_trace(path)
    return path


def d2l_time_machine_corpus(path: str, max_tokens: int = 10000):
    """d2l's load_corpus_time_machine: letters only, lower case, lines joined without
    separators, character tokens, the first max_tokens. Returns (ids, index_to_char)."""
    with open(path, encoding="utf-8") as f:
        lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in f]
    chars = [c for line in lines for c in line]
    counts = collections.Counter(chars)
    index_to_char = ["<unk>"] + sorted(counts, key=lambda c: (-counts[c], c))
    char_to_index = {c: i for i, c in enumerate(index_to_char)}
    return np.array([char_to_index[c] for c in chars][:max_tokens]), index_to_char


def _d2l_sequential_batches(corpus, batch_size, num_steps, rng):
    """d2l's seq_data_iter_sequential."""
    offset = int(rng.integers(0, num_steps + 1))
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = torch.from_numpy(corpus[offset:offset + num_tokens]).reshape(batch_size, -1)
    ys = torch.from_numpy(corpus[offset + 1:offset + 1 + num_tokens]).reshape(batch_size, -1)
    for i in range(0, num_steps * (xs.shape[1] // num_steps), num_steps):
        yield xs[:, i:i + num_steps], ys[:, i:i + num_steps]


def d2l_recipe_end_to_end(corpus_path: str, *, num_epochs: int = 500, batch_size: int = 32,
                          num_steps: int = 35, hidden: int = 256, layers: int = 2,
                          lr: float = 2.0, seed: int = 0) -> dict:
    """Wall time of the book's deep-LSTM recipe as d2l's train_ch8 runs it in PyTorch:
    sequential batches with the state carried (detached) across them, a host sync per batch,
    a 50-character greedy sample from "time traveller" every 10 epochs."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus, index_to_char = d2l_time_machine_corpus(corpus_path)
    vocab = len(index_to_char)
    model = TorchRNNLM("lstm", vocab, hidden, layers).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    char_to_index = {c: i for i, c in enumerate(index_to_char)}

    def forward(x, state):
        inputs = nn.functional.one_hot(x.T.long(), vocab).to(torch.float32)
        y, state = model.rnn(inputs, state)
        return model.linear(y.reshape(-1, y.shape[-1])), state

    def predict(prefix, length=50):
        state, outputs = None, [char_to_index[prefix[0]]]
        for ch in prefix[1:]:
            _, state = forward(torch.tensor([[outputs[-1]]], device=device), state)
            outputs.append(char_to_index[ch])
        for _ in range(length):
            y, state = forward(torch.tensor([[outputs[-1]]], device=device), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
        return "".join(index_to_char[i] for i in outputs)

    perplexity = float("nan")
    for epoch in range(num_epochs):
        state, loss_sum, count = None, 0.0, 0
        for x, y in _d2l_sequential_batches(corpus, batch_size, num_steps, rng):
            if state is not None:
                state = tuple(s.detach() for s in state)
            y = y.T.reshape(-1).to(device)
            y_hat, state = forward(x.to(device), state)
            loss = loss_fn(y_hat, y.long()).mean()
            optimizer.zero_grad()
            loss.backward()
            _d2l_grad_clipping(model, 1.0)
            optimizer.step()
            loss_sum += float(loss.detach() * y.numel())
            count += y.numel()
        perplexity = float(np.exp(loss_sum / count))
        if (epoch + 1) % 10 == 0:
            predict("time traveller")
    _sync(device)
    return {"wall_s": time.perf_counter() - start, "epochs": num_epochs,
            "train_perplexity": perplexity, "sample": predict("time traveller"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def define_flags(values) -> None:
    fv = {"flag_values": values}
    flags.DEFINE_string("text", None, "time_machine.txt, as d2l reads it.", **fv)
    flags.DEFINE_integer("epochs", 500, "Epochs of the recipe.", **fv)
    flags.DEFINE_integer("threads", 0, "torch CPU threads (0: torch's default).", **fv)


def main(argv) -> dict:
    """`python -m deeprnn.bench.torch_peers --text=TEXT`: the recipe end to end; prints one JSON
    line (run as its own process by end_to_end.py, so that its wall time includes torch's
    import)."""
    values, positional = parse_argv(define_flags, argv, "deeprnn.bench.torch_peers")
    if positional or not values.text:
        raise UsageError("give the text as --text=PATH/time_machine.txt, and only flags")
    keep_freed_host_memory()  # as in the deeprnn process it is compared with
    set_threads(values.threads)
    set_precision((False, False))  # full float32, as the deeprnn process it is compared with
    result = d2l_recipe_end_to_end(values.text, num_epochs=values.epochs)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    with exit_on_usage_error():
        main(sys.argv[1:])
