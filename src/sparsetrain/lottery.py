"""Lottery tickets (Frankle & Carbin, 2019): iterative magnitude pruning with rewinding.

Round 0 trains the dense network. Each later round prunes the previous round's
trained weights by magnitude to the next density on the geometric path to the target
(density (1 - s)^(r / rounds)), rewinds the kept weights to their values at
initialisation (or at step ``rewind_step`` of round 0) and trains again with that
mask fixed. Each round is an ordinary run in ``OUT/roundR``: a finished round is
skipped and an interrupted one resumes, so the whole search is resumable between
(and within) rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config
from .distributions import layer_densities
from .masks import select_parameters
from .schemes import parse_scheme
from .scores import masks_from_scores
from .train.checkpoint import load_checkpoint, save_checkpoint
from .train.trainer import FINAL_MODEL, Trainer

__all__ = ["lottery_ticket", "round_sparsities"]


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """Sparsity trained in each round 0..rounds: 0, then geometrically to ``sparsity``."""
    return [1 - (1 - sparsity) ** (r / rounds) for r in range(rounds + 1)]


def _round_config(cfg: Config, r: int, sparsity: float) -> Config:
    d = cfg.model_dump()
    d["run"]["out_dir"] = str(Path(cfg.run.out_dir) / f"round{r}")
    d["sparsity"]["method"] = "dense" if r == 0 else "static"
    d["sparsity"]["sparsity"] = sparsity
    return Config.model_validate(d)


def lottery_ticket(cfg: Config, datasets=None) -> dict:
    """Run every round of the ticket search and return the final round's summary (with the search's total cost)."""
    lcfg = cfg.sparsity.lottery
    levels = round_sparsities(cfg.sparsity.sparsity, lcfg.rounds)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    rewind_file = out / "rewind.pt"
    summaries: list[dict] = []
    for r, sparsity in enumerate(levels):
        rcfg = _round_config(cfg, r, sparsity)
        rdir = Path(rcfg.run.out_dir)
        if (rdir / "final.json").exists():
            summaries.append(json.loads((rdir / "final.json").read_text()))
            continue
        masks = None
        if r > 0:
            trained = load_checkpoint(Path(rcfg.run.out_dir).parent / f"round{r - 1}" / FINAL_MODEL)["model"]
            params = {n: trained[n] for n in select_parameters(_fresh_model(rcfg), cfg.sparsity.dense_layers)}
            shapes = {n: tuple(p.shape) for n, p in params.items()}
            densities = layer_densities(cfg.sparsity.distribution, shapes, sparsity, cfg.sparsity.custom_sparsity)
            scores = {n: p.abs() for n, p in params.items()}
            masks = masks_from_scores(scores, densities, parse_scheme(cfg.sparsity.scheme), cfg.sparsity.global_ranking)
        trainer = Trainer(rcfg, datasets=datasets, masks=masks)
        if r == 0:
            if lcfg.rewind_step == 0 and not rewind_file.exists():
                save_checkpoint({"format": 1, "model": trainer.model.state_dict()}, rewind_file)
            trainer.snapshot = (lcfg.rewind_step, rewind_file) if lcfg.rewind_step else None
        else:
            rewind = load_checkpoint(rewind_file)["model"]
            trainer.model.load_state_dict(rewind)
            trainer.method.maskset.apply()
        summaries.append(trainer.fit())
    spent = sum(s["train_flops_rel"] for s in summaries)
    final = {**summaries[-1], "method": "lottery", "rounds": lcfg.rounds, "train_flops_rel": spent,
             "train_flops_rel_last_round": summaries[-1]["train_flops_rel"],
             "round_sparsities": levels, "round_test_acc": [s.get("test_acc") for s in summaries]}
    (out / "final.json").write_text(json.dumps(final, indent=2))
    last_dir = out / f"round{lcfg.rounds}"
    for name in ("metrics.jsonl", FINAL_MODEL):
        (out / name).write_bytes((last_dir / name).read_bytes())
    return final


def _fresh_model(cfg: Config) -> torch.nn.Module:
    from .data import DATASETS
    from .models import build_model

    return build_model(cfg.model.name, DATASETS[cfg.data.dataset].num_classes, cfg.model.width)
