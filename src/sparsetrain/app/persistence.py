"""What a Trainer saves and how it resumes: the checkpoint's contents (model, optimizer, method with its execution
plan, recipe, data position, RNG, accounting, the configuration and data it was made by), the checks a resume
makes, and the final summary. A mixin of :class:`~sparsetrain.app.trainer.Trainer`, kept apart so that the
engine's loop reads on its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.accounting import peak_memory_bytes
from ..core.sharding import whole
from ..execution.backends import get_backend
from ..execution.plan import ExecutionPlan
from .checkpoint import CheckpointError, load_checkpoint, load_sharded, save_checkpoint, save_sharded
from .distributed import barrier
from .resume import changes_refused, config_changes, data_fingerprint
from .run_accounting import saved_bytes_per_step
from .rundir import CHECKPOINT, CHECKPOINT_FORMAT, SHARDED_CHECKPOINT

__all__ = ["Resumable", "Progress", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or weights); the message names the step and what to change."""


@dataclass
class Progress:
    """Where a run is: epochs and steps done, training time, and the current epoch's running sums."""

    epoch: int = 0
    step: int = 0  # global optimizer steps taken
    elapsed: float = 0.0  # wall seconds of training so far, across resumes
    # the current epoch's running sums (checkpointed, so an epoch's loss and accuracy span a resume)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    correct: int = 0
    seen: int = 0


class Resumable:
    """Checkpoints, resume and the final summary of a Trainer (which holds every attribute used here)."""

    def _layer_records(self) -> list[dict]:
        """Every weight matrix or kernel of the model: the method's sparse layers, then the ones it leaves dense."""
        sparse = self.method.report()
        out = [
            {
                "name": ls.name,
                "shape": list(ls.shape),
                "numel": ls.numel,
                "nonzeros": ls.nonzeros,
                "density": ls.density,
                "dense": False,
            }
            for ls in sparse
        ]
        seen = {ls.name for ls in sparse}
        for n, p in self.model.named_parameters():
            if n.endswith("weight") and p.dim() >= 2 and n not in seen:
                out.append(
                    {
                        "name": n,
                        "shape": list(p.shape),
                        "numel": p.numel(),
                        "nonzeros": int(p.count_nonzero()),
                        "density": 1.0,
                        "dense": True,
                    }
                )
        return out

    def state_dict(self) -> dict:
        """Everything a resumed run needs: model, optimizer, method, recipe, data position, RNG, accounting."""
        sharded, p = self.sharded, self.progress  # sharded: model, optimizer and method go to SHARDED_CHECKPOINT
        return {
            "format": CHECKPOINT_FORMAT,
            "sharded": sharded,
            "model": {} if sharded else self.model.state_dict(),
            "optimizer": {} if sharded else self.optimizer.state_dict(),
            "method": {} if sharded else self.method.state_dict(),
            "plan": self.method.plan.to_dict(),  # also in the method's state; here for the set-up of sharded runs
            "forgetting": self.forgetting.state_dict() if self.forgetting else {},
            "recipe": self.recipe.state_dict() if self.recipe else {},
            "loader": self.train_loader.state_dict(),
            "flops": self.accounting.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "progress": {
                "epoch": p.epoch,
                "step": p.step,
                "elapsed": p.elapsed,
                "loss_sum": p.loss_sum.cpu(),
                "correct": p.correct,
                "seen": p.seen,
            },
            "fingerprint": self._fingerprint(),
        }

    def _fingerprint(self) -> dict:
        """What the run computes: the resolved config and the training data (a resume must match them)."""
        if not hasattr(self, "_data_fp"):
            self._data_fp = data_fingerprint(self.train_set, self.test_loader.dataset)
        return {
            "config": self.cfg.model_dump(mode="json"),
            "data": self._data_fp,
            "changes": getattr(self, "_changes", []),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (method and recipe first, then the weights into their layout)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint format {state.get('format')!r} is not this version's ({CHECKPOINT_FORMAT}); "
                "start the run in a new directory"
            )
        p, saved = state["progress"], state["fingerprint"]
        self.progress = Progress(
            int(p["epoch"]),
            int(p["step"]),
            float(p["elapsed"]),
            p["loss_sum"].to(torch.float64),
            int(p["correct"]),
            int(p["seen"]),
        )
        if saved["data"] != self._fingerprint()["data"]:
            raise CheckpointError(
                f"{self.out.path}: the training data differ from those the run started on "
                f"(fingerprint {saved['data']} then, {self._data_fp} now); start a new run directory"
            )
        changes = config_changes(saved["config"], self.cfg.model_dump(mode="json"))
        if (why := changes_refused(changes, self.cfg.run.resume_with_changes)) is not None:
            raise CheckpointError(f"{self.out.path} holds a run with {why}")
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        self._changes = list(saved.get("changes", [])) + (
            [{"step": self.progress.step, "changes": diff}] if changes else []
        )
        try:
            if bool(state.get("sharded")) != self.sharded:
                raise ValueError(
                    f"the checkpoint was written {'with' if state.get('sharded') else 'without'} "
                    "run.parallel=fsdp; resume it the same way, or load its model and optimizer with "
                    "sparsetrain.app.checkpoint"
                )
            # method and recipe first: compact layers take the saved layout, removed ghosts leave, then the weights
            if self.sharded:
                load_sharded(self.out / SHARDED_CHECKPOINT, self.model, self.optimizer, self.method)
            else:
                self.method.load_state_dict(state["method"])
            if self.recipe:
                self.recipe.load_state_dict(state["recipe"])
            if not self.sharded:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            if self.forgetting:
                self.forgetting.load_state_dict(state["forgetting"])
            self.train_loader.load_state_dict(state["loader"])
            self.accounting.load_state_dict(state["flops"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{self.out / CHECKPOINT} does not fit this model and method ({type(e).__name__}: "
                f"{str(e)[:300]}); start a new run directory"
            ) from None
        if self.forgetting and self.forgetting.removed.numel():
            self.method.steps_per_epoch = len(self.train_loader)
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save(self) -> None:
        """Write the checkpoint (rank 0; under FSDP every rank writes its shards first) and wait for every rank."""
        if self.sharded:
            save_sharded(self.out / SHARDED_CHECKPOINT, self.model, self.optimizer, self.method)
        if self.is_main:
            save_checkpoint(self.state_dict(), self.out / CHECKPOINT)
        barrier()

    def _saved_plan(self) -> ExecutionPlan | None:
        """The execution plan of the run directory's checkpoint, if there is one for the configured backend."""
        try:
            path = self.out / CHECKPOINT  # mapped, not read: only its plan is needed before the resume loads it
            saved = load_checkpoint(path, self.device, mmap=True).get("plan") if path.exists() else None
            plan = ExecutionPlan.from_dict(saved) if saved else None
        except (CheckpointError, ValueError):
            return None  # the resume itself says what is wrong with the checkpoint
        return (
            plan if plan is not None and get_backend(plan.requested) is get_backend(self.cfg.sparsity.backend) else None
        )

    def finish(self) -> dict:
        """Write the final model and a summary (``final.json``) with per-layer sparsity and FLOPs."""
        infer, infer_rel = self.accounting.inference()
        # bytes saved for backward, measured on a copy of the model (which a sharded model has not)
        saved = (
            None
            if self.sharded
            else saved_bytes_per_step(self.model, self.criterion, *self._scoring_batches(count=1)[0])
        )
        rc = self.recipe
        summary = {
            "method": self.method.label,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.dataset,
            "epochs": self.cfg.optim.epochs,
            "seed": self.cfg.run.seed,
            "sparsity": self.method.sparsity(),
            "train_flops_rel": self.accounting.relative(),
            "infer_flops_rel": infer_rel,
            "train_flops": self.flops.spent["total"],
            "steps": self.progress.step,
            "steps_full_data": self.total_steps,
            "examples_removed": int(self.forgetting.removed.numel()) if self.forgetting else 0,
            "recipe": "+".join(rc.components()) if rc else None,
            "init_scales": (rc.init_scales or None)
            if rc
            else None,  # what rescaled initialisation multiplied each tensor by
            "resumed_with_changes": getattr(self, "_changes", None) or None,
            "backends": {n: m.ran or m.backend for n, m in self.method.execution_layers.items()} or None,  # what ran
            **self.method.summary(),
            "infer_flops_per_sample": infer,
            "wall_s": round(self.progress.elapsed, 2),
            "saved_bytes_per_step": saved,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "layers": self._layer_records(),
        }
        last = self.out.last_record()
        summary.update(
            {k: last[k] for k in ("test_acc", "test_loss", "val_acc", "val_loss", "val_ppl", "train_loss") if k in last}
        )
        weights = {k: whole(v) for k, v in self.method.export_state().items()}  # every rank gathers alike
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingError(
                f"the final weights hold non-finite values ({bad[:3]}) after step {self.progress.step}; "
                "nothing was written as the final model. Lower optim.lr (or check the data) and train again"
            )
        self.out.finish(weights, summary)
        barrier()
        return summary
