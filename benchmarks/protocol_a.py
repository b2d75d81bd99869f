"""Protocol A of the benchmark protocols: ResNet-20 on CIFAR-10, 15 epochs, one run per method.

    python benchmarks/protocol_a.py --data ../shared/data/cifar10-jpeg.tar --runs dense static-random

Resumable twice over: a run with a record in benchmarks/results/protocol_a.jsonl is
skipped, and an unfinished run continues from its checkpoint in benchmarks/runs/.
Each finished run appends one record and writes its accuracy curve as a PNG
(protocol_a-RUN-MODEL-sSEED.png; at a budget other than 15 epochs, -eEPOCHS before the seed).

With ``--val-fraction F`` the run trains on the rest of the training set, holds F of it out, and
appends to protocol_a_validation.jsonl instead (with ``val_acc``): the place to choose between
variants without looking at test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, append_record, command_line, commit, environment, read_records  # noqa: E402

from sparsetrain.app import Trainer
from sparsetrain.app.config import RecipeConfig, load_config
from sparsetrain.app.report import plot_curves

RESULTS_FILE = "protocol_a.jsonl"
VALIDATION_FILE = "protocol_a_validation.jsonl"
RERUN_FILE = "protocol_a_rerun.jsonl"  # runs repeated after a change of the engine, beside their first records
EPOCHS = 15  # the protocol's budget; a run at another budget names its curve with it, so neither overwrites the other

# name -> (method label in the record, config overrides). Sparse runs: 90%, first conv and classifier dense.
# MEST as in its paper's code: uniform distribution (first conv and classifier dense); it mutates every epoch here
# (the paper: every 5 of 160+ epochs), scaled to the 15-epoch budget. static-random, SET and RigL use ERK.
S90 = ["sparsity.sparsity=0.9"]
MEST = ["sparsity.method=mest", *S90, "sparsity.distribution=uniform", "sparsity.mest.every_epochs=1"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", ["sparsity.method=dense"]),
    "static-random": ("static-random", ["sparsity.method=static", *S90, "sparsity.distribution=erk"]),
    "snip": ("snip", ["sparsity.method=static", *S90, "sparsity.init=snip", "sparsity.global_ranking=true"]),
    "grasp": ("grasp", ["sparsity.method=static", *S90, "sparsity.init=grasp", "sparsity.global_ranking=true"]),
    "synflow": ("synflow", ["sparsity.method=static", *S90, "sparsity.init=synflow", "sparsity.global_ranking=true"]),
    "set": ("set", ["sparsity.method=set", *S90, "sparsity.distribution=erk", "sparsity.update_decay=constant"]),
    "rigl": ("rigl", ["sparsity.method=rigl", *S90, "sparsity.distribution=erk"]),
    "mest-em": ("mest-em", MEST),
    "mest-ems": ("mest-ems", [*MEST, "sparsity.mest.soft_bound=true"]),
    "mest-ems-data": (
        "mest-ems-data",
        [
            *MEST,
            "sparsity.mest.soft_bound=true",
            "sparsity.data_efficiency.enabled=true",
            "sparsity.data_efficiency.remove_epoch=3",
            "sparsity.data_efficiency.remove_fraction=0.2",
        ],
    ),
    # at the 15-epoch budget: MEST on ERK (the distribution RigL, SET and static use), and gentler RigL updates
    "mest-ems-erk": (
        "mest-ems",
        [
            "sparsity.method=mest",
            *S90,
            "sparsity.distribution=erk",
            "sparsity.mest.every_epochs=1",
            "sparsity.mest.soft_bound=true",
        ],
    ),
    "rigl-gentle": (
        "rigl",
        [
            "sparsity.method=rigl",
            *S90,
            "sparsity.distribution=erk",
            "sparsity.update_every_steps=200",
            "sparsity.update_fraction=0.1",
        ],
    ),
}
# MEST's mutation interval at this budget, chosen on a validation split (--val-fraction): every 2 or 3 epochs
for _every in (2, 3, 4):  # 4: the every-epoch interval scaled to the 60-epoch budget (budget_sweep.py)
    RUNS[f"mest-ems-erk-every{_every}"] = (
        "mest-ems",
        [*[o for o in RUNS["mest-ems-erk"][1] if "every_epochs" not in o], f"sparsity.mest.every_epochs={_every}"],
    )

# SWAT: the classifier is sparse and the first conv dense (the paper's default); activations at the weight sparsity.
SWAT = ["sparsity.method=swat", "sparsity.swat.topk_period=20"]
RUNS.update(
    {
        "swat-u80": ("swat-u", [*SWAT, "sparsity.sparsity=0.8"]),
        "swat-u90": ("swat-u", [*SWAT, "sparsity.sparsity=0.9"]),
        "swat-erk90": ("swat-erk", [*SWAT, "sparsity.sparsity=0.9", "sparsity.swat.variant=erk"]),
        "swat-m90": ("swat-m", [*SWAT, "sparsity.sparsity=0.9", "sparsity.swat.variant=m"]),
        "swat-structured50": ("swat-structured", [*SWAT, "sparsity.sparsity=0.5", "sparsity.swat.variant=structured"]),
        "swat-structured70": ("swat-structured", [*SWAT, "sparsity.sparsity=0.7", "sparsity.swat.variant=structured"]),
    }
)

# ToST ablation (issue: any mask trains better): 98% static masks with the default protocol and with ToST,
# and each ToST component alone on the random mask. Record: method = the mask, recipe = "tost" or the component.
S98 = ["sparsity.method=static", "sparsity.sparsity=0.98"]
MASKS98 = {
    "random": ["sparsity.distribution=erk"],
    "snip": ["sparsity.init=snip", "sparsity.global_ranking=true"],
    "synflow": ["sparsity.init=synflow", "sparsity.global_ranking=true"],
}
COMPONENTS = {
    "ghost-soft": "recipe.ghost_soft=true",
    "ghost-skip": "recipe.ghost_skip=true",
    "rescale-init": "recipe.rescale_init=gradinit",
    "label-smoothing": "recipe.label_smoothing=0.1",
}
for _mask, _extra in MASKS98.items():
    _label = "static-random" if _mask == "random" else _mask
    RUNS[f"{_mask}98"] = (_label, [*S98, *_extra])
    RUNS[f"{_mask}98-tost"] = (_label, [*S98, *_extra, "recipe.name=tost"])
for _name, _switch in COMPONENTS.items():
    for _mask in MASKS98:
        RUNS[f"{_mask}98-{_name}"] = (RUNS[f"{_mask}98"][0], [*S98, *MASKS98[_mask], _switch])
# the recipe default's open questions, settled on a validation split: ghost skips on or off (GradInit was
# then in the default, so these runs switch it on) ...
for _mask in MASKS98:
    for _skips, _on in (("skips", "true"), ("noskip", "false")):
        RUNS[f"{_mask}98-tost-{_skips}"] = (
            RUNS[f"{_mask}98"][0],
            [*S98, *MASKS98[_mask], "recipe.name=tost", f"recipe.ghost_skip={_on}", "recipe.rescale_init=gradinit"],
        )
# ... and which initial rescaling: none, GradInit or the kept fan-in
for _mask in MASKS98:
    for _rescale in ("none", "gradinit", "fan_in"):
        RUNS[f"{_mask}98-tost-rescale-{_rescale.replace('_', '')}"] = (
            RUNS[f"{_mask}98"][0],
            [*S98, *MASKS98[_mask], "recipe.name=tost", f"recipe.rescale_init={_rescale}"],
        )
# exploration of the ghost-phase length (ToST ends both ghosts at 20% of training, where the
# curves dip): ToST with the ghosts held to 25% and gone by 50%
RUNS["random98-tost-ghosts50"] = (
    "static-random",
    [
        *S98,
        *MASKS98["random"],
        "recipe.name=tost",
        "recipe.ghost_skip=true",
        "recipe.rescale_init=gradinit",
        "recipe.soft_hold=0.25",
        "recipe.soft_blend_end=0.5",
        "recipe.skip_end=0.5",
    ],
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 source (e.g. ../shared/data/cifar10-jpeg.tar)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=sorted(RUNS))
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of the training set and record to the validation file",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--results", default=None, help=f"record to this file of results/ instead of {RESULTS_FILE}")
    ap.add_argument(
        "--rerun",
        action="store_true",
        help="run again what is already recorded (to check a change of the engine against the records) "
        f"and record to {RERUN_FILE}",
    )
    args = ap.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        ap.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    started_at = commit()  # the code that runs is the code at start, whatever lands meanwhile
    results_file = VALIDATION_FILE if args.val_fraction else RERUN_FILE if args.rerun else args.results or RESULTS_FILE
    split = (f"-val{round(args.val_fraction * 100)}" if args.val_fraction else "") + ("-rerun" if args.rerun else "")
    records = read_records(results_file)
    done = {
        (r.get("run") or r["method"], r["seed"], r["epochs"], r["model"], r.get("val_fraction", 0.0)) for r in records
    }
    for name in args.runs:
        method, overrides = RUNS[name]
        if (name, args.seed, args.epochs, args.model, args.val_fraction) in done:
            print(f"{name}: already recorded, skipped")
            continue
        out = ROOT / "benchmarks" / "runs" / f"{name}-{args.model}-e{args.epochs}-s{args.seed}{split}"
        cfg = load_config(
            overrides=[
                f"data.data_dir={args.data}",
                f"model.name={args.model}",
                f"optim.epochs={args.epochs}",
                f"run.seed={args.seed}",
                f"run.out_dir={out}",
                "run.checkpoint_every_steps=100",
                f"data.val_fraction={args.val_fraction}",
                f"run.threads={args.threads}",
                f"run.device={args.device}",
                *overrides,
            ]
        )
        trainer = Trainer(cfg)
        summary = trainer.fit()
        record = {
            "protocol": "A",
            "run": name,
            "model": args.model,
            "dataset": "cifar10",
            "method": method,
            "recipe": _recipe_label(summary.get("recipe")),
            "sparsity": round(summary["sparsity"], 4),
            "epochs": args.epochs,
            "seed": args.seed,
            "test_acc": summary["test_acc"],
            "train_flops_rel": round(summary["train_flops_rel"], 4),
            "infer_flops_rel": round(summary["infer_flops_rel"], 4),
            "wall_s": summary["wall_s"],
            "command": command_line(),
            "commit": started_at,
            "device": trainer.device.type,
            **environment(),
            **({"val_fraction": args.val_fraction, "val_acc": summary["val_acc"]} if args.val_fraction else {}),
            **{
                k: summary[k]
                for k in (
                    "steps",
                    "steps_full_data",
                    "examples_removed",
                    "peak_density",
                    "mask_updates",
                    "activation_sparsity",
                )
                if k in summary
            },
        }
        append_record(results_file, record)
        plot_curves([out], RESULTS / curve_name(name, args.model, args.seed, args.epochs, split))
        print(json.dumps(record))


def curve_name(run: str, model: str, seed: int, epochs: int, split: str = "") -> str:
    """The file name of a run's accuracy curve: the budget appears only where it is not the protocol's 15 epochs."""
    budget = "" if epochs == EPOCHS else f"-e{epochs}"
    return f"protocol_a-{run}-{model}{budget}-s{seed}{split}.png"


def _recipe_label(components: str | None) -> str | None:
    """'tost' when the default ToST components ran ('tost+<extra>' with more), else the components' names."""
    if not components:
        return None
    parts = components.split("+")
    default = RecipeConfig(name="tost").components()
    if not set(default) <= set(parts):
        return components
    return "+".join(["tost", *[p for p in parts if p not in default]])


if __name__ == "__main__":
    main()
