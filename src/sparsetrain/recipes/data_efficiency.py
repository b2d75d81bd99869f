"""MEST's data efficiency: forgetting statistics, then training without the unforgettable examples.

Each training example is presented once per epoch. A *forgetting event* is a
presentation classified wrongly after the previous one was classified correctly
(Toneva et al., 2019). At ``remove_epoch`` the examples with the fewest events are
removed, never-learned examples counting as the most forgotten; ties go by a seeded
random order. Training continues on the rest with the same per-epoch schedule, so
every later epoch has fewer iterations. Under data parallelism each rank sees
different examples; the per-epoch outcomes are summed across ranks before the
statistics are updated, so every rank holds the same statistics and removes the same
examples.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = ["ForgettingTracker", "DataEfficiency", "KeptSampler", "WithIndices"]


class ForgettingTracker:
    """Per-example forgetting statistics over the training set, and the one-time removal."""

    def __init__(self, num_examples: int, remove_epoch: int, remove_fraction: float, seed: int = 0):
        self.n = num_examples
        self.remove_epoch, self.remove_fraction, self.seed = remove_epoch, remove_fraction, seed
        self.last_correct = torch.full((num_examples,), -1, dtype=torch.int8)  # -1: never presented
        self.forgets = torch.zeros(num_examples, dtype=torch.int32)
        self.learned = torch.zeros(num_examples, dtype=torch.bool)
        self.removed = torch.empty(0, dtype=torch.long)
        self._seen = torch.zeros(num_examples, dtype=torch.int8)
        self._correct = torch.zeros(num_examples, dtype=torch.int8)

    def record(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        """Outcomes of one batch's presentations (called every training step)."""
        idx = indices.cpu()
        self._seen[idx] = 1
        self._correct[idx] = correct.cpu().to(torch.int8)

    def end_epoch(self, epochs_done: int) -> torch.Tensor | None:
        """Fold this epoch's outcomes into the statistics; at ``remove_epoch`` return the kept indices."""
        seen, correct = self._seen, self._correct
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            seen, correct = seen.to(torch.int32), correct.to(torch.int32)
            dist.all_reduce(seen)
            dist.all_reduce(correct)
        seen, correct = seen.bool(), correct.bool()
        forgot = seen & (self.last_correct == 1) & ~correct
        self.forgets += forgot.to(torch.int32)
        self.learned |= seen & correct
        self.last_correct = torch.where(seen, correct.to(torch.int8), self.last_correct)
        self._seen.zero_()
        self._correct.zero_()
        if epochs_done != self.remove_epoch or self.removed.numel():
            return None
        return self.select()

    def select(self) -> torch.Tensor:
        """Remove the least-forgotten share of examples; return the (sorted) indices kept."""
        n_remove = round(self.remove_fraction * self.n)
        rank = self.forgets.to(torch.float64)
        rank[~self.learned] = float("inf")  # never learned: most forgotten
        tiebreak = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).to(torch.float64) / self.n
        order = torch.argsort(rank + tiebreak * 0.5)
        self.removed = order[:n_remove].sort().values
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[self.removed] = False
        return keep.nonzero().squeeze(1)

    def state_dict(self) -> dict:
        """The statistics so far (for checkpoints)."""
        return {
            "last_correct": self.last_correct,
            "forgets": self.forgets,
            "learned": self.learned,
            "removed": self.removed,
            "seen": self._seen,
            "correct": self._correct,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.last_correct, self.forgets, self.learned = state["last_correct"], state["forgets"], state["learned"]
        self.removed, self._seen, self._correct = state["removed"], state["seen"], state["correct"]


class KeptSampler(Sampler[int]):
    """Shuffles the kept examples anew each epoch (seeded by ``seed`` and the epoch), for any DataLoader."""

    def __init__(self, num_examples: int, seed: int = 0):
        self.kept = torch.arange(num_examples)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order (call before iterating each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(self.kept[torch.randperm(len(self.kept), generator=g)].tolist())

    def __len__(self) -> int:
        return len(self.kept)


class WithIndices(Dataset):
    """A dataset whose items carry their index last: ``(*item, index)``, so a loop can ``record`` outcomes."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


class DataEfficiency:
    """MEST's data efficiency for any training loop: record outcomes, then skip the unforgettable examples.

    Give your DataLoader ``sampler=de.sampler`` and a dataset wrapped in :class:`WithIndices`; after
    each batch call ``de.record(indices, predictions == targets)``; at each epoch's end call
    ``de.end_epoch()``. At ``remove_epoch`` the ``remove_fraction`` least-forgotten examples leave
    the sampler, and a given ``sparsifier`` learns the shorter epoch (``batch_size`` examples a step),
    so epoch-based schedules (MEST's mutations) stay on epochs.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        remove_epoch: int = 3,
        remove_fraction: float = 0.2,
        seed: int = 0,
        sparsifier=None,
        batch_size: int | None = None,
        drop_last: bool = False,
    ):
        if not isinstance(remove_epoch, int) or remove_epoch < 1:
            raise ValueError(f"remove_epoch must be a positive integer, got {remove_epoch!r}")
        if not 0 < remove_fraction < 1:
            raise ValueError(f"remove_fraction must be in (0, 1), got {remove_fraction!r}")
        if sparsifier is not None and batch_size is None:
            raise ValueError("give batch_size with sparsifier, so the shorter epoch's steps can be counted")
        self.tracker = ForgettingTracker(num_examples, remove_epoch, remove_fraction, seed)
        self.sampler = KeptSampler(num_examples, seed)
        self.sparsifier, self.batch_size, self.drop_last = sparsifier, batch_size, drop_last
        self.epoch = 0

    def record(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        """Outcomes (bool per example) of one batch's presentations."""
        self.tracker.record(torch.as_tensor(indices), torch.as_tensor(correct))

    def end_epoch(self) -> torch.Tensor | None:
        """Close an epoch; at ``remove_epoch`` return the kept indices (the sampler then yields only those)."""
        self.epoch += 1
        keep = self.tracker.end_epoch(self.epoch)
        if keep is not None:
            self._keep(keep)
        self.sampler.set_epoch(self.epoch)
        return keep

    def _keep(self, keep: torch.Tensor) -> None:
        self.sampler.kept = keep
        if self.sparsifier is not None:
            n = len(keep) // self.batch_size if self.drop_last else math.ceil(len(keep) / self.batch_size)
            self.sparsifier.steps_per_epoch = max(n, 1)

    @property
    def removed(self) -> torch.Tensor:
        """Indices removed so far (sorted)."""
        return self.tracker.removed

    def state_dict(self) -> dict:
        """Statistics, epoch and kept examples (for checkpoints)."""
        return {"tracker": self.tracker.state_dict(), "epoch": self.epoch, "kept": self.sampler.kept}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.tracker.load_state_dict(state["tracker"])
        self.epoch = int(state["epoch"])
        self.sampler.kept = state["kept"]
        self.sampler.set_epoch(self.epoch)
