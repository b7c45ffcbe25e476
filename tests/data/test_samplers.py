"""The samplers against hand-worked examples and against a transcription of d2l 0.17's code."""

import random

import numpy as np
import pytest

from deeprnn.data import samplers as batches
from deeprnn.data.samplers import RandomSampler, SequentialSampler, eval_batches, make_sampler
from deeprnn.errors import UsageError


class FixedRng:
    """Stands in for the epoch's generator: a chosen offset and window order."""

    def __init__(self, offset, order=None):
        self.offset, self.order = offset, order

    def integers(self, low, high):
        assert low <= self.offset < high
        return self.offset

    def permutation(self, n):
        return np.asarray(self.order(n) if self.order else np.arange(n))


def fix_epochs(monkeypatch, offset, order=None):
    monkeypatch.setattr(batches, "_epoch_rng", lambda seed, epoch: FixedRng(offset, order))


def d2l_random(corpus, batch_size, num_steps, offset, order):
    """d2l 0.17 seq_data_iter_random with random.randint / random.shuffle made explicit."""
    corpus = corpus[offset:]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    initial_indices = [initial_indices[i] for i in order(num_subseqs)]
    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        starts = initial_indices[i: i + batch_size]
        yield ([corpus[j: j + num_steps] for j in starts],
               [corpus[j + 1: j + 1 + num_steps] for j in starts])


def d2l_sequential(corpus, batch_size, num_steps, offset):
    """d2l 0.17 seq_data_iter_sequential with random.randint made explicit."""
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = np.array(corpus[offset: offset + num_tokens]).reshape(batch_size, -1)
    ys = np.array(corpus[offset + 1: offset + 1 + num_tokens]).reshape(batch_size, -1)
    for i in range(0, num_steps * (xs.shape[1] // num_steps), num_steps):
        yield xs[:, i: i + num_steps], ys[:, i: i + num_steps]


def test_random_windows_by_hand(monkeypatch):
    fix_epochs(monkeypatch, offset=1, order=lambda n: np.arange(n)[::-1])
    sampler = RandomSampler(np.arange(20), batch_size=2, num_steps=3, seed=0)
    # Worst offset 2: (20 - 2 - 1) // 3 = 5 windows -> 2 batches. Offset 1: 6 windows at
    # 1, 4, ..., 16, served in reverse order: 16, 13 | 10, 7 (| 4, 1 dropped).
    assert sampler.steps_per_epoch == 2
    x, y = sampler.batch(0)
    assert x.dtype == np.int32 and x.tolist() == [[16, 17, 18], [13, 14, 15]]
    assert y.tolist() == [[17, 18, 19], [14, 15, 16]]
    assert sampler.batch(1)[0].tolist() == [[10, 11, 12], [7, 8, 9]]
    assert sampler.batch(2)[0].tolist() == [[16, 17, 18], [13, 14, 15]]  # next epoch
    assert sampler.resets_state(0) and sampler.resets_state(1)


def test_sequential_streams_by_hand(monkeypatch):
    fix_epochs(monkeypatch, offset=2)
    sampler = SequentialSampler(np.arange(20), batch_size=2, num_steps=3, seed=0)
    # Offset 2: (20 - 2 - 1) // 2 = 8 tokens per stream, streams at 2 and 10.
    assert sampler.steps_per_epoch == 2  # worst offset 3: (20 - 3 - 1) // 2 // 3
    (x0, y0), (x1, y1) = sampler.batch(0), sampler.batch(1)
    assert x0.tolist() == [[2, 3, 4], [10, 11, 12]] and y0.tolist() == [[3, 4, 5], [11, 12, 13]]
    assert x1.tolist() == [[5, 6, 7], [13, 14, 15]] and y1.tolist() == [[6, 7, 8], [14, 15, 16]]
    # State continuity: each stream's next input is the target that ended its last batch.
    assert (x1[:, 0] == y0[:, -1]).all()
    assert [sampler.resets_state(s) for s in range(5)] == [True, False, True, False, True]


@pytest.mark.parametrize("offset", [0, 1, 4])
def test_random_matches_d2l_code(monkeypatch, offset):
    corpus = list(range(100, 157))
    order = lambda n: np.random.default_rng(n).permutation(n)  # noqa: E731
    fix_epochs(monkeypatch, offset, order)
    sampler = RandomSampler(np.array(corpus), batch_size=3, num_steps=5, seed=0)
    reference = list(d2l_random(corpus, 3, 5, offset, order))
    assert len(reference) >= sampler.steps_per_epoch >= len(reference) - 1
    for step in range(sampler.steps_per_epoch):
        x, y = sampler.batch(step)
        assert x.tolist() == reference[step][0] and y.tolist() == reference[step][1]


@pytest.mark.parametrize("offset", [0, 3, 5])
def test_sequential_matches_d2l_code(monkeypatch, offset):
    corpus = list(range(100, 161))
    fix_epochs(monkeypatch, offset)
    sampler = SequentialSampler(np.array(corpus), batch_size=3, num_steps=5, seed=0)
    reference = list(d2l_sequential(corpus, 3, 5, offset))
    assert len(reference) >= sampler.steps_per_epoch >= len(reference) - 1
    for step in range(sampler.steps_per_epoch):
        x, y = sampler.batch(step)
        assert (x == reference[step][0]).all() and (y == reference[step][1]).all()


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_epoch_offsets_in_d2l_range_and_windows_disjoint(kind):
    ids, num_steps = np.arange(1000), 7
    sampler = make_sampler(kind, ids, 4, num_steps, seed=3)
    offsets = set()
    for epoch in range(12):
        steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
        starts = np.concatenate([sampler.batch(s)[0][:, 0] for s in steps])
        assert len(np.unique(starts)) == len(starts)  # no window served twice in an epoch
        offsets.add(int(starts.min() % num_steps) if kind == "random" else int(starts.min()))
    assert offsets <= set(range(num_steps if kind == "random" else num_steps + 1))
    assert len(offsets) > 1  # a fresh random offset per epoch


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_resume_from_step_k_equals_uninterrupted_stream(kind):
    ids = np.random.default_rng(0).integers(0, 50, 500)
    first = make_sampler(kind, ids, 4, 6, seed=11)
    stream = [first.batch(s) for s in range(60)]  # crosses several epochs
    resumed = make_sampler(kind, ids, 4, 6, seed=11)
    for step in [37, 38, 59, 5, 37]:  # any order: batch(step) is a pure function
        assert all((a == b).all() for a, b in zip(resumed.batch(step), stream[step], strict=True))
    other_seed = make_sampler(kind, ids, 4, 6, seed=12)
    assert any((other_seed.batch(s)[0] != stream[s][0]).any() for s in range(10))


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_process_rows_are_disjoint_and_cover_the_global_batch(kind):
    ids = np.arange(400)  # ids are positions, so rows identify windows
    whole = make_sampler(kind, ids, 6, 5, seed=4)
    shards = [make_sampler(kind, ids, 6, 5, seed=4, rows=r) for r in [(0, 2), (2, 3), (3, 6)]]
    for step in [0, 1, whole.steps_per_epoch, 3 * whole.steps_per_epoch + 2]:
        parts = [s.batch(step) for s in shards]
        assert [p[0].shape[0] for p in parts] == [2, 1, 3]
        x, y = whole.batch(step)
        assert (np.concatenate([p[0] for p in parts]) == x).all()
        assert (np.concatenate([p[1] for p in parts]) == y).all()
        assert all(s.resets_state(step) == whole.resets_state(step) for s in shards)


@pytest.mark.parametrize("kind,needed", [("random", (2 + 1) * 5), ("sequential", 3 * 5 + 1)])
def test_text_shorter_than_one_batch_window(kind, needed):
    make_sampler(kind, np.arange(needed), 2, 5, seed=0)
    with pytest.raises(UsageError, match=rf"{needed - 1} tokens.*batch_size=2 x num_steps=5"):
        make_sampler(kind, np.arange(needed - 1), 2, 5, seed=0)


def test_bad_sampler_arguments():
    with pytest.raises(UsageError, match="unknown sampler"):
        make_sampler("shuffled", np.arange(100), 2, 5, 0)
    with pytest.raises(UsageError, match="rows"):
        make_sampler("random", np.arange(100), 2, 5, 0, rows=(1, 3))
    with pytest.raises(UsageError, match="batch_size"):
        make_sampler("random", np.arange(100), 0, 5, 0)
    with pytest.raises(UsageError, match="flat integer"):
        make_sampler("random", np.zeros((10, 10), np.int32), 2, 5, 0)


def test_eval_batches_by_hand():
    # 11 tokens in 3 streams of 4, 4, 3 (at 0, 4, 8): 3 + 3 + 2 targets over 2 windows of 2.
    got = list(eval_batches(np.arange(11), batch_size=3, num_steps=2))
    assert len(got) == 2
    (x0, y0, m0), (x1, y1, m1) = got
    assert x0.tolist() == [[0, 1], [4, 5], [8, 9]] and y0.tolist() == [[1, 2], [5, 6], [9, 10]]
    assert m0.dtype == np.float32 and m0.tolist() == [[1, 1]] * 3
    assert x1.tolist() == [[2, 0], [6, 0], [0, 0]] and y1.tolist() == [[3, 0], [7, 0], [0, 0]]
    assert m1.tolist() == [[1, 0], [1, 0], [0, 0]]


@pytest.mark.parametrize("length,batch_size,num_steps", [(11, 3, 2), (100, 7, 5), (64, 8, 4)])
def test_eval_batches_score_every_target_once(length, batch_size, num_steps):
    ids = np.arange(length)  # ids are positions, so targets name what was scored
    scored, stream_starts = [], None
    for x, y, mask in eval_batches(ids, batch_size, num_steps):
        stream_starts = x[:, 0] if stream_starts is None else stream_starts
        assert (y[mask == 1] == x[mask == 1] + 1).all()  # next-token targets
        scored.extend(y[mask == 1].tolist())
    assert len(scored) == len(set(scored)) == length - batch_size
    assert set(scored) == set(range(length)) - set(stream_starts.tolist())


def test_eval_batches_too_short():
    with pytest.raises(UsageError, match="eval_batch_size"):
        eval_batches(np.arange(5), batch_size=3, num_steps=2)


def test_same_seed_same_stream_whatever_the_global_random_state():
    random.seed(0)
    a = RandomSampler(np.arange(300), 4, 5, seed=9).batch(3)
    random.seed(1)
    b = RandomSampler(np.arange(300), 4, 5, seed=9).batch(3)
    assert (a[0] == b[0]).all()
