"""Any sparsifier in a Hugging Face ``transformers.Trainer``, with checkpoints and resume.

::

    from functools import partial
    import sparsetrain as st
    from sparsetrain.integrations.huggingface import SparsityCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[SparsityCallback(partial(st.mest, sparsity=0.9))])
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)
    plain = trainer.callback_handler.callbacks[-1].sparsifier.remove()

The method is built at ``on_train_begin`` (the Trainer creates its optimizer inside ``train()``),
with the length of training the Trainer computed: optimizer steps per epoch, epochs and
``max_steps``. Its work then runs inside ``optimizer.step()``, which the Trainer calls after
gradient clipping. Its state is saved as ``checkpoint-N/sparsetrain.pt`` whenever the Trainer
saves a checkpoint, and restored on ``resume_from_checkpoint`` (after the Trainer has restored the
weights and the optimizer state). Requires ``pip install "sparsetrain[hf]"``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..methods.base import Sparsifier
from . import Factory, build_all, execution_options, restore_all, snapshot

__all__ = ["SparsityCallback", "STATE_FILE"]

STATE_FILE = "sparsetrain.pt"


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper: its step hooks are the ones that run."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class SparsityCallback(TrainerCallback):
    """A ``TrainerCallback`` that trains the model with the sparsifier(s) ``make`` builds.

    ``make(model, optimizer, *, total_steps, steps_per_epoch, epochs)``: e.g.
    ``functools.partial(sparsetrain.rigl, sparsity=0.9)``, or a function returning a list
    (a method and ``sparsetrain.tost`` around it).

    ``execution`` (an :class:`~sparsetrain.execution.options.ExecutionOptions`, a backend's name, ``"auto"`` or an
    ``ExecutionPlan``) and the other execution options by keyword (``compact_state``, ``lossless_activations``,
    ...) run the method's layers really sparse; the plan is saved with the checkpoints and a resumed run applies
    it without timing again.

    ``on_checkpoint(sparsifier, folder)`` runs after each checkpoint is saved (main process), e.g. to write the
    sparse model beside it: ``on_checkpoint=lambda sp, folder: st.save_sparse(sp, folder / "model.sparse.safetensors")``
    (the kept values and a bitmask: the size of the kept weights).
    """

    def __init__(self, make: Factory, *, execution=None, on_checkpoint=None, **options):
        if on_checkpoint is not None and not callable(on_checkpoint):
            raise TypeError(
                f"on_checkpoint must be a function of (sparsifier, folder), got {type(on_checkpoint).__name__}"
            )
        self.make, self.execution = make, execution_options(execution, options)
        self.on_checkpoint = on_checkpoint
        self.sparsifiers: list = []

    @property
    def sparsifier(self):
        """The (first) sparsifier built, or None before training starts."""
        return self.sparsifiers[0] if self.sparsifiers else None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("SparsityCallback needs the Trainer's model and optimizer at on_train_begin")
        steps_per_epoch = (
            max(len(train_dataloader) // args.gradient_accumulation_steps, 1) if train_dataloader is not None else None
        )
        epochs = math.ceil(state.num_train_epochs) if steps_per_epoch else None
        resumed = state.global_step > 0
        weights = snapshot(model) if resumed else None
        self.sparsifiers = build_all(
            self.make,
            model,
            _torch_optimizer(optimizer),
            total_steps=state.max_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            execution=self.execution,
        )
        if resumed:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.exists():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {path} does not exist: the checkpoint "
                    "was not saved with SparsityCallback (or lies elsewhere than output_dir)"
                )
            saved = torch.load(path, map_location="cpu", weights_only=True)
            restore_all(self.sparsifiers, saved["sparsifiers"], model, weights)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.sparsifiers:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"sparsifiers": [sp.state_dict() for sp in self.sparsifiers]}, folder / STATE_FILE)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.sparsifier, folder)

    def on_log(self, args, state, control, logs=None, **kwargs):
        sp = self.sparsifier
        if logs is not None and isinstance(sp, Sparsifier):
            logs["sparsity"] = round(sp.sparsity(), 6)
