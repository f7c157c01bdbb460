"""SetBatchSampler's argument checks, its positions, the draw's preference and the loaders' resume state.

The edges of every check (the smallest accepted value next to the largest refused one), the
positions a fresh or re-iterated sampler reports, that a class whose images are used up is drawn
only when too few others are left, and :class:`LoaderPosition`.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmcam_fast.data.sampler import LoaderPosition, SetBatchSampler
from mmcam_fast.errors import ConfigError, DataError


def _labels(counts: list[int], seed: int = 0) -> list[int]:
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels).tolist()


# ---------------------------------------------------------------------------------------------
# argument checks: the edge values
# ---------------------------------------------------------------------------------------------
def test_one_set_per_batch_and_one_image_per_set_are_accepted():
    labels = _labels([4, 4, 4])
    assert len(list(SetBatchSampler(labels, 1, 2, seed=0))) == 6  # N = 1
    sampler = SetBatchSampler(labels, 3, 1, seed=0)  # S = 1 (the trainer asks for S >= 2, not the sampler)
    assert all(len(b) == 3 for b in sampler)
    assert SetBatchSampler(labels, 2, 3, seed=0).batch_size == 6 == 2 * 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_sets": 0}, "--sets-per-batch must be at least 1, got 0"),
    ({"set_size": 0}, "--set-size must be at least 1, got 0"),
    ({"rank": 2, "world_size": 2}, "rank 2 is not in a world of size 2"),
    ({"rank": -1, "world_size": 2}, "rank -1 is not in a world of size 2"),
    ({"rank": 0, "world_size": 0}, "rank 0 is not in a world of size 0"),
])
def test_out_of_range_arguments_are_refused(kwargs, message):
    args = {"num_sets": 2, "set_size": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        SetBatchSampler(_labels([4, 4, 4]), args.pop("num_sets"), args.pop("set_size"), seed=0, **args)


def test_the_last_rank_of_a_world_is_accepted():
    sampler = SetBatchSampler(_labels([8, 8, 8, 8]), 2, 2, seed=0, rank=1, world_size=2)
    assert len(list(sampler)) == len(sampler) == 4  # 32 images / (2 x 2 x 2 ranks)


@pytest.mark.parametrize("labels", [[[0, 1], [1, 0]], [], [[]]], ids=["2-D", "empty", "empty-2-D"])
def test_labels_must_be_a_non_empty_vector(labels):
    with pytest.raises(DataError, match="no images to sample from"):
        SetBatchSampler(labels, 1, 1, seed=0)


def test_a_negative_label_is_refused():
    with pytest.raises(DataError, match="negative class label -1"):
        SetBatchSampler([0, 0, 1, 1, -1], 1, 1, seed=0)


@pytest.mark.parametrize(("small", "shown", "more"), [(5, 5, None), (6, 5, 1), (7, 5, 2)])
def test_the_small_class_message_lists_five_and_counts_the_rest(small, shown, more):
    labels = _labels([1] * small + [10, 10])
    with pytest.raises(DataError) as info:
        SetBatchSampler(labels, 2, 2, seed=0)
    message = str(info.value)
    assert message.count(" has 1") == shown
    assert (f"(and {more} more)" in message) if more else "(and" not in message


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------
def test_a_fresh_sampler_and_a_new_epoch_start_at_batch_zero():
    sampler = SetBatchSampler(_labels([6] * 4), 2, 3, seed=0)
    assert sampler.state_dict()["position"] == 0 and sampler.next_position == 0
    list(sampler)
    assert sampler.state_dict()["position"] == len(sampler)
    sampler.set_epoch(3)
    assert sampler.state_dict()["position"] == 0 and sampler.next_position == 0


def test_iterating_an_epoch_again_yields_it_whole_again():
    sampler = SetBatchSampler(_labels([6] * 4), 2, 3, seed=0)
    first, second = list(sampler), list(sampler)
    assert first == second and len(first) == len(sampler) == 4
    assert sampler.next_position == 0


def test_resuming_at_the_start_or_the_end_of_an_epoch():
    sampler = SetBatchSampler(_labels([6] * 4), 2, 3, seed=0)
    sampler.set_epoch(1)
    epoch = list(sampler)
    for position in (0, len(sampler)):
        resumed = SetBatchSampler(_labels([6] * 4), 2, 3, seed=0)
        resumed.load_state_dict({**sampler.state_dict(), "position": position})
        assert resumed.epoch == 1 and resumed.next_position == position
        assert list(resumed) == epoch[position:]
    with pytest.raises(ConfigError, match="position 5 is outside the epoch of 4"):
        resumed.load_state_dict({**sampler.state_dict(), "position": 5})
    with pytest.raises(ConfigError, match="position -1 is outside"):
        resumed.load_state_dict({**sampler.state_dict(), "position": -1})


# ---------------------------------------------------------------------------------------------
# the draw: a used-up class only when too few others are left
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("counts", "n", "s"), [([3, 3, 9, 9, 9, 9], 2, 3), ([4, 12, 12, 12], 2, 2)])
def test_a_used_up_class_is_drawn_only_when_fewer_than_n_others_have_images_left(counts, n, s):
    labels = _labels(counts)
    sampler = SetBatchSampler(labels, n, s, seed=1)
    forced = 0
    for epoch in range(20):
        sampler.set_epoch(epoch)
        unused = np.array(counts, dtype=np.int64)
        for batch in sampler:
            classes = [labels[batch[i * s]] for i in range(n)]
            used_up = [c for c in classes if unused[c] <= 0]
            if used_up:
                # a class with images left had a weight of at least 1 against 1e-6 for a used-up one
                assert int((unused > 0).sum()) < n, (epoch, classes, unused.tolist())
                forced += 1
            for c in classes:
                unused[c] -= s
    assert forced < 20 * len(sampler)  # the rule is not vacuous: most steps had classes to spare


# ---------------------------------------------------------------------------------------------
# LoaderPosition
# ---------------------------------------------------------------------------------------------
class _Loader(LoaderPosition):
    def __init__(self, sampler):
        self.batch_sampler = sampler
        self.epoch = 0
        self.consumed = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.consumed = 0
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)


def test_loader_position_saves_and_restores_the_sampler_at_the_consumed_batch():
    sampler = SetBatchSampler(_labels([6] * 4), 2, 3, seed=0)
    loader = _Loader(sampler)
    loader.set_epoch(2)
    batches = iter(sampler)
    next(batches), next(batches), next(batches)  # the sampler ran ahead of the consumer
    loader.consumed = 1
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["position"] == 1 and state["sampler"]["position"] == 1

    resumed = _Loader(SetBatchSampler(_labels([6] * 4), 2, 3, seed=0))
    resumed.load_state_dict(state)
    assert resumed.epoch == 2 and resumed.consumed == 1 and resumed.batch_sampler.next_position == 1
    sampler.set_epoch(2)
    assert list(resumed.batch_sampler) == list(sampler)[1:]


def test_loader_position_without_a_set_sampler():
    loader = _Loader(None)
    loader.set_epoch(1)
    loader.consumed = 3
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 3}
    other = _Loader(None)
    other.load_state_dict({**state, "sampler": {"position": 3}})  # a set sampler's state, ignored
    assert other.epoch == 1 and other.consumed == 0


def test_a_forced_slot_goes_to_any_used_up_class():
    """When a step needs a used-up class, which one is drawn at random (equal tiny weights)."""
    counts, n, s = [6, 3, 3], 2, 3
    labels = _labels(counts)
    sampler = SetBatchSampler(labels, n, s, seed=2)
    forced = []
    for epoch in range(40):
        sampler.set_epoch(epoch)
        unused = np.array(counts, dtype=np.int64)
        for batch in sampler:
            classes = [labels[batch[i * s]] for i in range(n)]
            forced += [c for c in classes if unused[c] <= 0]
            for c in classes:
                unused[c] -= s
    assert len(forced) >= 4 and len(set(forced)) > 1, forced


def test_seed_and_the_options_are_keyword_only():
    with pytest.raises(TypeError):
        SetBatchSampler(_labels([4, 4]), 1, 2, 0)  # the seed given by position
