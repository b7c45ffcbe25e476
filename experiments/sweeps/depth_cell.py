"""Depth x cell type on The Time Machine: how do depth and gating change perplexity and speed?

Answers the book's exercises "LSTM vs GRU vs RNN" and "what does depth buy": 3 cells x 3 depths,
everything else from the honest held-out Time Machine recipe.

    python -m launch.local --sweep=depth_cell --sweep_dir=/tmp/depth_cell --data_dir=...
    python -m deeprnn.report --sweep_dir=/tmp/depth_cell
"""

from collections.abc import Iterator

BASE_FLAGFILE = "experiments/time_machine_lstm.flags"
CELLS = ("rnn", "gru", "lstm")
NUM_LAYERS = (1, 2, 4)


def runs() -> Iterator[tuple[str, dict]]:
    for cell in CELLS:
        for num_layers in NUM_LAYERS:
            yield f"{cell}_l{num_layers}", {
                "corpus": "time_machine",
                "cell": cell,
                "num_layers": num_layers,
            }
