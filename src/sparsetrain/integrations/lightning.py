"""Any sparsifier in a Lightning ``Trainer``, with checkpoints and resume.

::

    from functools import partial
    import lightning as L
    import sparsetrain as st
    from sparsetrain.integrations.lightning import SparsityCallback

    cb = SparsityCallback(partial(st.rigl, sparsity=0.9))
    L.Trainer(max_epochs=10, callbacks=[cb]).fit(module, loader)   # or .fit(..., ckpt_path=...)
    plain = cb.sparsifier.remove()

The method is built at ``on_fit_start``, once Lightning has created the optimizer (the first of
``configure_optimizers``), with the length of training from ``estimated_stepping_batches`` and
``max_epochs``. Lightning runs backward inside ``optimizer.step(closure)``, so the callback sets
``manual_pre_step`` and runs the method's pre-step work (RigL's gradient growth, gradient masking)
in ``on_before_optimizer_step``, after backward. Its state travels in the Lightning checkpoint
under ``"sparsetrain"``; on ``fit(ckpt_path=...)`` it is restored before Lightning restores the
optimizer. Requires ``pip install "sparsetrain[lightning]"``.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback

from . import Factory, build_all, execution_options, restore_all, snapshot

__all__ = ["SparsityCallback", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "sparsetrain"


class SparsityCallback(Callback):
    """A Lightning ``Callback`` that trains the module with the sparsifier(s) ``make`` builds.

    ``make(module, optimizer, *, total_steps, steps_per_epoch, epochs)``: e.g.
    ``functools.partial(sparsetrain.mest, sparsity=0.9)``, or a function returning a list.

    ``execution`` (an :class:`~sparsetrain.execution.options.ExecutionOptions`, a backend's name, ``"auto"`` or an
    ``ExecutionPlan``) and the other execution options by keyword (``compact_state``, ``lossless_activations``,
    ...) run the method's layers really sparse; the plan is saved with the checkpoints and a resumed run applies
    it without timing again.
    """

    def __init__(self, make: Factory, *, execution=None, **options):
        self.make, self.execution = make, execution_options(execution, options)
        self.sparsifiers: list = []
        self._pending: list[dict] | None = None

    @property
    def sparsifier(self):
        """The (first) sparsifier built, or None before fitting starts."""
        return self.sparsifiers[0] if self.sparsifiers else None

    def on_fit_start(self, trainer, pl_module):
        if not trainer.optimizers:
            raise RuntimeError("SparsityCallback needs an optimizer from configure_optimizers")
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"SparsityCallback wraps one optimizer; configure_optimizers returned {len(trainer.optimizers)}"
            )
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError("SparsityCallback counts epochs: set Trainer(max_epochs=...)")
        total = int(trainer.estimated_stepping_batches)
        epochs = trainer.max_epochs
        steps_per_epoch = max(math.ceil(total / epochs), 1)
        weights = snapshot(pl_module) if self._pending is not None else None
        self.sparsifiers = build_all(
            self.make,
            pl_module,
            trainer.optimizers[0],
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            execution=self.execution,
        )
        for sp in self.sparsifiers:
            sp.manual_pre_step = True  # backward runs inside optimizer.step(closure)
        if self._pending is not None:
            restore_all(self.sparsifiers, self._pending, pl_module, weights)
            self._pending = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for sp in self.sparsifiers:
            sp.pre_step()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = [sp.state_dict() for sp in self.sparsifiers]
        owned = {k for sp in self.sparsifiers for k in sp.model_state_keys()}
        for k in owned:  # the method restores these itself; without them the plain module loads strictly
            checkpoint["state_dict"].pop(k, None)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if CHECKPOINT_KEY not in checkpoint:
            raise KeyError(f"the checkpoint has no {CHECKPOINT_KEY!r} entry: it was not saved with SparsityCallback")
        self._pending = checkpoint[CHECKPOINT_KEY]
