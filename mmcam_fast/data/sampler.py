"""The set-structured batch sampler of MinMaxCAM: N distinct classes x S images per batch.

A batch is a list of ``N * S`` dataset indices in set-major order: indices ``n*S .. n*S+S-1`` form
set ``n`` and share one class; the ``N`` classes of a batch are distinct (see docs/method.md,
"Batches").

How an epoch is drawn (all of it from one generator seeded by ``(seed, epoch)``, so an epoch is a
pure function of the seed, the epoch and the labels):

* Every class has a *stream* of its images: a random permutation of them, followed by another one
  when it runs out, and so on. A set takes the next ``S`` images of its class's stream, so within an
  epoch every image of a class is used once before any image of it is used twice, and the images of
  one set are always distinct (a set that straddles two permutations skips an image it already
  holds; the skipped image stays at the head of the stream for the next set).
* Classes are drawn with probability proportional to the number of their images not yet used in
  this epoch (sampling without replacement, Gumbel top-k). A class that has been used a lot becomes
  less likely and a class that has been left out more likely, which is what spreads an epoch evenly
  over the images; with balanced classes the draw stays close to uniform. A class whose images are
  used up keeps a tiny weight, so it is drawn only when fewer than ``N`` others are left.
* One *step* draws the batches of all ``world_size`` ranks together: ``N * world_size`` set slots,
  where a class offers ``min(world_size, floor(n_c / S))`` slots. The slots are grouped by class and
  dealt to the ranks column by column, so the copies of one class go to different ranks and every
  rank gets ``N`` distinct classes. Within a step no image is given twice, so the ranks' batches are
  disjoint. Every rank computes the same step and keeps its own row.

An epoch has ``floor(num_images / (N * S * world_size))`` steps, so each rank sees about one pass
over its share of the data. ``state_dict()`` holds the epoch and the number of batches already
handed out; loading it replays the epoch up to that point (cheap: no image is touched), so a resumed
run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mmcam_fast.errors import ConfigError, DataError

# Weight of a class whose images are all used in this epoch: it still wins a slot when fewer than N
# classes with unused images are left, and practically never otherwise.
_EXHAUSTED_WEIGHT = 1e-6


class SetBatchSampler:
    """Yields batches of ``num_sets`` distinct classes x ``set_size`` images, set-major.

    Args:
        labels: the class label of every dataset index.
        num_sets: N, the number of sets (distinct classes) per batch (``--sets-per-batch``).
        set_size: S, the number of images per set (``--set-size``).
        seed: seed of the whole sequence; epoch ``e`` uses the generator seeded by ``(seed, e)``.
        replacement: let a class with fewer than ``S`` images fill its sets by drawing with
            replacement; without it such a class is an error. Classes with at least ``S`` images
            are always drawn without replacement.
        rank: this process's rank; it receives row ``rank`` of every step.
        world_size: number of ranks drawing from the same sequence.
        class_names: optional class names, used in error messages.

    Raises:
        DataError: a class has fewer than ``S`` images (and ``replacement`` is off).
        ConfigError: fewer than ``N`` classes have images, the data cannot fill one step, or the
            arguments are out of range.
    """

    def __init__(self, labels: Sequence[int], num_sets: int, set_size: int, *, seed: int,
                 replacement: bool = False, rank: int = 0, world_size: int = 1,
                 class_names: Sequence[str] | None = None) -> None:
        if num_sets < 1:
            raise ConfigError(f"--sets-per-batch must be at least 1, got {num_sets}")
        if set_size < 1:
            raise ConfigError(f"--set-size must be at least 1, got {set_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
        labels_array = np.asarray(labels, dtype=np.int64)
        if labels_array.ndim != 1 or labels_array.size == 0:
            raise DataError("the training set has no images to sample from")
        if labels_array.min() < 0:
            raise DataError(f"negative class label {int(labels_array.min())} in the training set")

        self.num_sets = num_sets
        self.set_size = set_size
        self.seed = int(seed)
        self.replacement = replacement
        self.rank = rank
        self.world_size = world_size

        # The classes that have images, and each one's dataset indices in dataset order.
        order = np.argsort(labels_array, kind="stable")
        present, starts, counts = np.unique(labels_array[order], return_index=True, return_counts=True)
        self._classes = present
        self._members = [order[s:s + c] for s, c in zip(starts, counts, strict=True)]
        self._counts = counts.astype(np.int64)

        def describe(label: int) -> str:
            if class_names is not None and 0 <= label < len(class_names):
                return f"class {label} ({class_names[label]})"
            return f"class {label}"

        small = [(int(c), int(n)) for c, n in zip(present, counts, strict=True) if n < set_size]
        if small and not replacement:
            shown = ", ".join(f"{describe(c)} has {n}" for c, n in small[:5])
            more = f" (and {len(small) - 5} more)" if len(small) > 5 else ""
            raise DataError(f"a set needs {set_size} images of one class (--set-size) but {shown} "
                            f"image(s){more}; pass --sample-with-replacement to sample such classes "
                            "with replacement, or lower --set-size")
        if len(present) < num_sets:
            raise ConfigError(f"--sets-per-batch {num_sets} needs that many distinct classes per batch, "
                              f"but only {len(present)} class(es) have images")

        # Set slots per class and step: a class can give world_size ranks a set each, as far as its
        # images reach without repeating one within the step.
        slots = np.minimum(world_size, np.maximum(self._counts // set_size, 1))
        if int(slots.sum()) < num_sets * world_size:
            raise ConfigError(f"--sets-per-batch {num_sets} x {world_size} ranks needs "
                              f"{num_sets * world_size} disjoint sets of {set_size} per step, but the "
                              f"classes can give only {int(slots.sum())}")
        self._slot_class = np.repeat(np.arange(len(present)), slots)  # class position of each slot

        self._labels_sha1 = hashlib.sha1(labels_array.tobytes()).hexdigest()
        self._steps = len(labels_array) // (num_sets * set_size * world_size)
        if self._steps == 0:
            raise ConfigError(f"the training set has {len(labels_array)} images, fewer than one step of "
                              f"--sets-per-batch {num_sets} x --set-size {set_size} x {world_size} "
                              "rank(s)")
        self.epoch = 0
        self._position = 0  # batches of this epoch already handed out
        self._start = 0  # where the next iteration starts (set by load_state_dict)

    def __len__(self) -> int:
        """Batches per epoch for this rank: ``floor(num_images / (N * S * world_size))``."""
        return self._steps

    @property
    def batch_size(self) -> int:
        return self.num_sets * self.set_size

    @property
    def next_position(self) -> int:
        """The batch of the current epoch the next iteration starts at (0 unless resumed)."""
        return self._start

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to draw next; the sequence of an epoch depends only on (seed, epoch)."""
        self.epoch = int(epoch)
        self._position = 0
        self._start = 0

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        self._position = start
        for step, rows in enumerate(self._epoch_steps()):
            if step >= start:
                self._position = step + 1
                yield rows[self.rank]

    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """The state a resumed run needs to continue the same sequence.

        Args:
            position: batches of the current epoch already consumed. Defaults to the number this
                sampler has handed out, which runs ahead of the consumer when a loader prefetches;
                a loader that counts consumed batches passes its own count.
        """
        return {"epoch": self.epoch, "position": self._position if position is None else int(position),
                **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields the rest of the saved epoch.

        Raises:
            ConfigError: the state was saved by a sampler with other settings or other labels.
        """
        identity = self._identity()
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}"
                   for k, v in identity.items() if state.get(k) != v]
        if changed:
            raise ConfigError("cannot resume the batch sequence, the sampler settings changed ("
                              + "; ".join(changed) + ")")
        position = int(state["position"])
        if not 0 <= position <= self._steps:
            raise ConfigError(f"sampler state position {position} is outside the epoch of {self._steps}")
        self.epoch = int(state["epoch"])
        self._start = self._position = position

    def _identity(self) -> dict[str, Any]:
        # What the sequence depends on besides (epoch, position); the label fingerprint catches a
        # resumed run pointed at a different data set.
        return {"seed": self.seed, "num_sets": self.num_sets, "set_size": self.set_size,
                "replacement": self.replacement, "world_size": self.world_size,
                "num_images": int(self._counts.sum()), "num_classes": len(self._classes),
                "labels_sha1": self._labels_sha1}

    # -- drawing ---------------------------------------------------------------------------------

    def _epoch_steps(self) -> Iterator[list[list[int]]]:
        """All steps of the current epoch; each step is one batch per rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        streams: list[list[int]] = [[] for _ in self._classes]
        unused = self._counts.astype(np.float64)  # images of each class not yet used this epoch
        n, s, w = self.num_sets, self.set_size, self.world_size
        for _ in range(self._steps):
            # Gumbel top-k over the slots = weighted sampling without replacement.
            weights = np.maximum(unused, _EXHAUSTED_WEIGHT)[self._slot_class]
            keys = np.log(weights) + rng.gumbel(size=len(weights))
            chosen = self._slot_class[np.argpartition(-keys, n * w - 1)[:n * w]]
            # Group the chosen slots by class (classes in random order) and deal them column-major,
            # so the <= world_size copies of one class land on different ranks.
            class_order = rng.permutation(np.unique(chosen)).tolist()
            rank_of = {c: i for i, c in enumerate(class_order)}
            grouped = sorted(chosen.tolist(), key=rank_of.__getitem__)
            rows: list[list[int]] = [grouped[r::w] for r in range(w)]
            used_in_step: dict[int, set[int]] = {}
            batches = []
            for row in rows:
                batch: list[int] = []
                for c in rng.permutation(row).tolist():
                    taken = used_in_step.setdefault(c, set())
                    batch.extend(self._take(c, streams[c], taken, rng))
                    unused[c] -= s
                batches.append(batch)
            yield batches

    def _take(self, c: int, stream: list[int], taken: set[int], rng: np.random.Generator) -> list[int]:
        """The next ``S`` images of class ``c``'s stream, none of them already used in this step."""
        members = self._members[c]
        s = self.set_size
        if len(members) < s:  # only with replacement: every image once, the rest drawn at random
            extra = rng.choice(members, size=s - len(members), replace=True)
            return rng.permutation(np.concatenate([members, extra])).tolist()
        chosen: list[int] = []
        i = 0
        while len(chosen) < s:
            if i == len(stream):
                stream.extend(rng.permutation(members).tolist())
            index = stream[i]
            if index in taken or index in chosen:
                i += 1  # skip it: it stays in the stream for a later set
            else:
                chosen.append(stream.pop(i))
        taken.update(chosen)
        return chosen


class LoaderPosition:
    """Resume state of a loader driven by a :class:`SetBatchSampler` (the torch and DALI loaders).

    The contract, public on both loaders: ``epoch``, ``consumed`` (batches handed out this epoch, which
    the loader counts as it yields), ``batch_sampler`` and ``set_epoch(epoch)``; this class turns them
    into ``state_dict`` / ``load_state_dict``, the same for both.
    """

    epoch: int
    consumed: int
    batch_sampler: SetBatchSampler | None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.consumed}
        if self.batch_sampler is not None:
            state["sampler"] = self.batch_sampler.state_dict(position=self.consumed)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the rest of the saved epoch (set-batch loaders only)."""
        self.set_epoch(state["epoch"])
        if self.batch_sampler is not None and "sampler" in state:
            self.batch_sampler.load_state_dict(state["sampler"])
            self.consumed = int(state["sampler"]["position"])
