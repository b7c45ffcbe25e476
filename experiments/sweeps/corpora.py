"""More text and more authors: how low can perplexity go, and does it carry to an unseen author?

Answers the book's exercises "train on more books" and "mix authors". Every run sees the same
number of training tokens (num_train_steps x batch_size x num_steps), so a larger corpus means
fewer passes over it, not more compute. Each run is scored on its own held-out test split by
the training program, and afterwards on War and Peace (Tolstoy: an author in no training set).

    python -m launch.local --sweep=corpora --sweep_dir=/tmp/corpora --data_dir=...
    python -m deeprnn.report --sweep_dir=/tmp/corpora
"""

from collections.abc import Iterator

BASE_FLAGFILE = "experiments/time_machine_lstm.flags"

# The d2l batch shape. 6,000 steps x 32 x 35 = 6.72M tokens: about 39 passes over The Time
# Machine and 6 over Tiny Shakespeare. Shrink every run alike with
# `--extra_flags=--num_train_steps=N`: the budgets stay matched.
BATCH_SIZE = 32
NUM_STEPS = 35
TOKEN_BUDGET = 6_000 * BATCH_SIZE * NUM_STEPS

# War and Peace is by an author left out of every training set below.
HELD_OUT_AUTHOR_CORPUS = "war_and_peace"

TRAINING_CORPORA = {
    "one_book": "time_machine",
    "two_wells_books": "time_machine,war_of_the_worlds",
    "three_authors": "time_machine,frankenstein,pride_and_prejudice",
    "tiny_shakespeare": "tiny_shakespeare",
}


def runs() -> Iterator[tuple[str, dict, dict]]:
    tokens_per_step = BATCH_SIZE * NUM_STEPS
    if TOKEN_BUDGET % tokens_per_step:
        raise ValueError("TOKEN_BUDGET must be a whole number of training steps")
    for name, spec in TRAINING_CORPORA.items():
        flags = {
            "corpus": spec,
            "batch_size": BATCH_SIZE,
            "num_steps": NUM_STEPS,
            "num_train_steps": TOKEN_BUDGET // tokens_per_step,
        }
        yield name, flags, {"eval_corpora": [HELD_OUT_AUTHOR_CORPUS]}
