"""The lottery-ticket search (Frankle & Carbin, 2019): rounds of iterative magnitude pruning with rewinding.

Round 0 trains the dense network. Each later round is one :func:`sparsetrain.lottery` round:
it prunes the previous round's trained weights by magnitude to the next density on the
geometric path to the target (density (1 - s)^(r / rounds)), rewinds the kept weights to their
values at initialisation (or at step ``rewind_step`` of round 0) and trains again with that
mask fixed. Each round is an ordinary run in ``OUT/roundR``: a finished round is skipped and
an interrupted one resumes, so the whole search is resumable between (and within) rounds.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..methods import Dense, Lottery, Static
from ..methods.knobs import SPARSITY
from ..methods.lottery import lottery, round_sparsities
from .checkpoint import load_checkpoint, save_checkpoint, write_atomic
from .config import Config
from .rundir import CHECKPOINT_FORMAT, FINAL_MODEL, RunDirectory
from .trainer import Trainer

__all__ = ["lottery_ticket", "round_sparsities", "rewind_at"]

# keys of the sparsity section that shape the ticket's masks (kept for rounds > 0): the round's flat knobs
_MASK_KEYS = tuple(k.name for k in Lottery.knobs if k.config and k.section is None and k is not SPARSITY)


def _round_config(cfg: Config, r: int, sparsity: float) -> Config:
    d = cfg.model_dump()
    d["run"]["out_dir"] = str(Path(cfg.run.out_dir) / f"round{r}")
    engine = {
        k: d["sparsity"][k] for k in ("backend", "compact_state", "data_efficiency") if r > 0 or k == "data_efficiency"
    }
    masks = {k: d["sparsity"][k] for k in _MASK_KEYS} if r > 0 else {}
    d["sparsity"] = {"method": Dense.name if r == 0 else Static.name, "sparsity": sparsity, **masks, **engine}
    return Config.model_validate(d)


def rewind_at(trainer: Trainer, step: int, path: Path):
    """Save the model's weights once, right after optimizer step ``step`` (the weights later rounds rewind to): an
    optimizer step hook, after the method's own (whose clock then has counted the step). Returns the hook's handle."""
    clock = trainer.method.clock

    def after_step(optimizer, args, kwargs):
        if clock.step == step and trainer.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "model": trainer.model.state_dict()}, path)

    return trainer.optimizer.register_step_post_hook(after_step)


def lottery_ticket(cfg: Config, datasets=None) -> dict:
    """Run every round of the ticket search and return the final round's summary (with the search's total cost)."""
    sc, lcfg = cfg.sparsity, cfg.sparsity.lottery
    levels = round_sparsities(sc.sparsity, lcfg.rounds)
    out = Path(cfg.run.out_dir)
    folder = RunDirectory(out)
    folder.prepare()  # locked for the search; each round's run folder is locked by its own Trainer
    folder.write_text("config.yaml", cfg.to_yaml())
    rewind_file = out / "rewind.pt"
    summaries: list[dict] = []
    for r, sparsity in enumerate(levels):
        rcfg = _round_config(cfg, r, sparsity)
        rdir = Path(rcfg.run.out_dir)
        if (rdir / "final.json").exists():
            summaries.append(json.loads((rdir / "final.json").read_text()))
            continue
        method = None
        if r > 0:
            trained = load_checkpoint(rdir.parent / f"round{r - 1}" / FINAL_MODEL)["model"]
            rewind = load_checkpoint(rewind_file)["model"]
            method = functools.partial(
                lottery,
                sparsity=sparsity,
                trained=trained,
                rewind=rewind,
                **{k: getattr(sc, k) for k in _MASK_KEYS if getattr(sc, k) is not None},
            )
        trainer = Trainer(rcfg, datasets=datasets, method=method)
        if r == 0:
            if lcfg.rewind_step == 0 and not rewind_file.exists():
                save_checkpoint({"format": CHECKPOINT_FORMAT, "model": trainer.model.state_dict()}, rewind_file)
            if lcfg.rewind_step:
                rewind_at(trainer, lcfg.rewind_step, rewind_file)
        summaries.append(trainer.fit())
    spent = sum(s["train_flops_rel"] for s in summaries)
    final = {
        **summaries[-1],
        "method": Lottery.name,
        "rounds": lcfg.rounds,
        "train_flops_rel": spent,
        "train_flops_rel_last_round": summaries[-1]["train_flops_rel"],
        "round_sparsities": levels,
        "round_test_acc": [s.get("test_acc") for s in summaries],
    }
    folder.write_text("final.json", json.dumps(final, indent=2))
    last_dir = out / f"round{lcfg.rounds}"
    for name in ("metrics.jsonl", FINAL_MODEL):
        data = (last_dir / name).read_bytes()
        write_atomic(out / name, lambda f, data=data: f.write(data))
    folder.unlock()
    return final
