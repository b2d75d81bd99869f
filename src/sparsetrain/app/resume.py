"""What a resume checks: that the run directory's checkpoint was made by the same configuration on the same data,
and which configuration changes a resume may accept (how the run is watched, or, asked for, the rest of the
schedule)."""

from __future__ import annotations

import hashlib

from .config import Config

__all__ = ["config_changes", "data_fingerprint", "changes_refused"]

# config keys a resume may change freely (how the run is watched and where things are, not what it computes)
HARMLESS = (
    "run.progress",
    "run.threads",
    "run.device",
    "run.eval_batch_size",
    "run.checkpoint_every_steps",
    "run.checkpoint_every_seconds",
    "run.out_dir",
    "run.resume_with_changes",
    "run.tensorboard",
    "data.data_dir",
    "data.cache_dir",
    "data.download",
)
# and those it may change with run.resume_with_changes (the schedule of the rest of the run, recorded)
SAFE_TO_CHANGE = (
    "optim.epochs",
    "optim.lr",
    "optim.schedule",
    "optim.warmup_epochs",
    "optim.milestones",
    "optim.gamma",
    "optim.weight_decay",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """``{key: (saved value, value now)}`` for every config key that differs, harmless ones left out. A key the
    saved run did not know (added by a later version) is no change while it holds its default: the run computes
    what it computed."""
    a, b = _flat(saved), _flat(now)
    defaults = _flat(Config().model_dump(mode="json"))
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and not k.startswith(HARMLESS)
        and not (k not in a and k in defaults and b.get(k) == defaults[k])
    }


def changes_refused(changes: dict[str, tuple], allowed: bool) -> str | None:
    """Why a resume with ``changes`` must not go on (None: it may; ``allowed``: run.resume_with_changes)."""
    if not changes:
        return None
    diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    unsafe = [k for k in changes if not k.startswith(SAFE_TO_CHANGE)]
    if unsafe:
        return f"another configuration ({diff}); these cannot change within a run: {', '.join(unsafe)}; start a new run directory"
    if not allowed:
        return (
            f"another configuration ({diff}); to continue with them anyway, set run.resume_with_changes=true "
            "(sparsetrain train --resume-with-changes)"
        )
    return None


def data_fingerprint(*datasets) -> str:
    """A short hash of the training data: sizes, labels and image bytes of arrays; sizes of other datasets."""
    h = hashlib.sha1()
    for d in datasets:
        h.update(str(len(d)).encode())
        if hasattr(d, "images"):
            h.update(d.labels.numpy().tobytes())
            h.update(d.images.numpy().tobytes())
    return h.hexdigest()[:16]
