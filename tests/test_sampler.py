"""Properties of SetBatchSampler: layout, determinism, epochs, coverage, ranks, resume, errors."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from mmcam_fast.data.sampler import SetBatchSampler
from mmcam_fast.errors import ConfigError, DataError


def _labels(counts: list[int], seed: int = 0) -> list[int]:
    """Labels with ``counts[c]`` images of class c, shuffled so that indices and classes differ."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels).tolist()


def _check_batch(batch: list[int], labels: list[int], n: int, s: int) -> None:
    assert len(batch) == n * s, f"batch of {len(batch)} indices, expected {n}x{s}"
    sets = [batch[i * s:(i + 1) * s] for i in range(n)]
    set_classes = []
    for k, members in enumerate(sets):
        classes = {labels[i] for i in members}
        assert len(classes) == 1, f"set {k} mixes classes {classes}: {members}"
        assert len(set(members)) == s, f"set {k} repeats an image: {members}"
        set_classes.append(classes.pop())
    assert len(set(set_classes)) == n, f"classes of the batch are not distinct: {set_classes}"


@pytest.mark.parametrize("counts,n,s", [
    ([20] * 10, 4, 5),  # balanced
    ([7, 40, 5, 13, 9, 60], 3, 5),  # imbalanced; class 2 has exactly S images
    ([6, 6, 6], 3, 2),  # every batch holds all classes
    ([11, 3, 17, 9], 2, 3),  # odd sizes, a class with exactly S
])
def test_layout_sizes_and_epoch_length(counts, n, s):
    labels = _labels(counts)
    sampler = SetBatchSampler(labels, n, s, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // (n * s)
    for batch in batches:
        _check_batch(batch, labels, n, s)


def test_same_seed_same_sequence_other_seed_or_epoch_differs():
    labels = _labels([20] * 10)
    a = list(SetBatchSampler(labels, 4, 5, seed=7))
    b = list(SetBatchSampler(labels, 4, 5, seed=7))
    c = list(SetBatchSampler(labels, 4, 5, seed=8))
    assert a == b
    assert a != c
    sampler = SetBatchSampler(labels, 4, 5, seed=7)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != a
    sampler.set_epoch(1)
    assert list(sampler) == epoch1, "set_epoch must make an epoch reproducible"
    sampler.set_epoch(0)
    assert list(sampler) == a


def test_classes_vary_across_batches():
    labels = _labels([10] * 12)
    sampler = SetBatchSampler(labels, 3, 2, seed=0)
    class_sets = {frozenset(labels[i] for i in batch) for batch in sampler}
    assert len(class_sets) > len(sampler) // 2, "classes should be drawn at random each batch"


def test_epoch_covers_images_evenly():
    # 10 balanced classes, one epoch draws exactly as many images as there are: the per-class
    # streams and the weighting by unused images should use nearly every image once. Independent
    # uniform draws (the authors' sampler) cover only about 1 - 1/e of them.
    labels = _labels([20] * 10)
    for epoch in range(3):
        sampler = SetBatchSampler(labels, 4, 5, seed=1)
        sampler.set_epoch(epoch)
        uses = Counter(itertools.chain.from_iterable(sampler))
        assert max(uses.values()) <= 2, f"an image drawn {max(uses.values())} times in one epoch"
        assert len(uses) >= 0.9 * len(labels), f"epoch {epoch} covered {len(uses)} of {len(labels)}"


def test_imbalanced_classes_are_drawn_in_proportion():
    labels = _labels([100, 25, 25, 25, 25])
    sampler = SetBatchSampler(labels, 2, 5, seed=0)
    per_class = Counter(labels[i] for batch in sampler for i in batch)
    # class 0 holds half of the images: it should get about half of the draws, not a fifth
    assert per_class[0] >= 0.4 * sum(per_class.values()), per_class


@pytest.mark.parametrize("counts,n,s,world", [
    ([30] * 8, 3, 5, 2),
    ([12, 40, 9, 25, 6, 30, 18], 2, 3, 3),  # small classes can serve fewer ranks per step
    ([10, 10, 10, 10], 2, 5, 2),
])
def test_ranks_are_disjoint_and_each_well_formed(counts, n, s, world):
    labels = _labels(counts)
    samplers = [SetBatchSampler(labels, n, s, seed=5, rank=r, world_size=world) for r in range(world)]
    assert {len(x) for x in samplers} == {len(labels) // (n * s * world)}
    for epoch in (0, 1):
        for x in samplers:
            x.set_epoch(epoch)
        for step, batches in enumerate(zip(*samplers, strict=True)):
            for batch in batches:
                _check_batch(batch, labels, n, s)
            flat = list(itertools.chain.from_iterable(batches))
            assert len(set(flat)) == len(flat), f"epoch {epoch} step {step}: ranks share images"


def test_rank_sequence_differs_per_rank():
    labels = _labels([30] * 8)
    r0 = list(SetBatchSampler(labels, 3, 5, seed=5, rank=0, world_size=2))
    r1 = list(SetBatchSampler(labels, 3, 5, seed=5, rank=1, world_size=2))
    assert r0 != r1


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_resume_mid_epoch_continues_the_same_sequence(world, rank):
    labels = _labels([20, 14, 30, 9, 22, 17])
    reference = SetBatchSampler(labels, 3, 3, seed=11, rank=rank, world_size=world)
    reference.set_epoch(2)
    full_epoch2 = list(reference)
    reference.set_epoch(3)
    full_epoch3 = list(reference)

    run = SetBatchSampler(labels, 3, 3, seed=11, rank=rank, world_size=world)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(4)]
    state = run.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4

    resumed = SetBatchSampler(labels, 3, 3, seed=11, rank=rank, world_size=world)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert head + tail == full_epoch2
    resumed.set_epoch(3)
    assert list(resumed) == full_epoch3


def test_state_dict_position_given_by_consumer():
    labels = _labels([20] * 6)
    sampler = SetBatchSampler(labels, 2, 5, seed=0)
    it = iter(sampler)
    batches = [next(it) for _ in range(5)]  # a prefetching loader ran ahead ...
    state = sampler.state_dict(position=2)  # ... but only two batches were consumed
    resumed = SetBatchSampler(labels, 2, 5, seed=0)
    resumed.load_state_dict(state)
    assert next(iter(resumed)) == batches[2]


def test_resume_with_other_settings_is_refused():
    labels = _labels([20] * 6)
    state = SetBatchSampler(labels, 2, 5, seed=0).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        SetBatchSampler(labels, 2, 5, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="labels_sha1"):
        SetBatchSampler(_labels([20] * 6, seed=1), 2, 5, seed=0).load_state_dict(state)


def test_small_class_is_an_error_naming_it():
    labels = _labels([10, 3, 10, 10])
    with pytest.raises(DataError, match=r"class 1 \(koala\) has 3 image") as info:
        SetBatchSampler(labels, 2, 5, seed=0, class_names=["cat", "koala", "dog", "emu"])
    assert "--set-size" in str(info.value)
    with pytest.raises(DataError, match=r"class 1 has 3"):
        SetBatchSampler(labels, 2, 5, seed=0)


def test_small_class_with_replacement():
    labels = _labels([10, 3, 10, 10])
    sampler = SetBatchSampler(labels, 4, 5, seed=0, replacement=True)
    for batch in sampler:
        sets = [batch[i * 5:(i + 1) * 5] for i in range(4)]
        for members in sets:
            assert len({labels[i] for i in members}) == 1
            if labels[members[0]] == 1:  # the small class: all 3 images, 2 of them twice
                assert sorted(Counter(members).values()) == [1, 2, 2] or sorted(
                    Counter(members).values()) == [1, 1, 3]
                assert len(set(members)) == 3
            else:
                assert len(set(members)) == 5, "classes with enough images stay without replacement"


def test_too_few_classes_names_the_flag():
    labels = _labels([10, 10, 10])
    with pytest.raises(ConfigError, match="--sets-per-batch 4"):
        SetBatchSampler(labels, 4, 2, seed=0)
    # classes without images do not count
    with pytest.raises(ConfigError, match="only 2 class"):
        SetBatchSampler([0] * 10 + [5] * 10, 3, 2, seed=0)


def test_too_few_images_for_one_step():
    # only possible with replacement: every class has fewer than S images
    with pytest.raises(ConfigError, match="fewer than one step"):
        SetBatchSampler(_labels([2, 3]), 2, 5, seed=0, replacement=True)


def test_ranks_need_enough_disjoint_sets_per_step():
    # 2 ranks x 2 sets need 4 disjoint sets of 5 per step; classes of 5 images give one each
    with pytest.raises(ConfigError, match="needs 4 disjoint sets"):
        SetBatchSampler(_labels([5, 5, 5]), 2, 5, seed=0, world_size=2)
