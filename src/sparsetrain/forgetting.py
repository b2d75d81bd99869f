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

import torch
import torch.distributed as dist

__all__ = ["ForgettingTracker"]


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
        return {"last_correct": self.last_correct, "forgets": self.forgets, "learned": self.learned,
                "removed": self.removed, "seen": self._seen, "correct": self._correct}

    def load_state_dict(self, state: dict) -> None:
        self.last_correct, self.forgets, self.learned = state["last_correct"], state["forgets"], state["learned"]
        self.removed, self._seen, self._correct = state["removed"], state["seen"], state["correct"]
