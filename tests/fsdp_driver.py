"""Trains small models with every method, alone or under FSDP2 (torchrun, gloo), and saves what the tests compare.

    python tests/fsdp_driver.py OUT.pt --model cnn --steps 200                      # one process, unsharded
    torchrun --nproc_per_node 2 tests/fsdp_driver.py OUT.pt --model cnn --steps 200  # two ranks, sharded

Each rank feeds the same batches, so the averaged gradient equals one process's and the runs must agree: the
masks after every change bit for bit, the weights within float32 tolerance. Rank 0 saves, per method, the
masks at every change (whole tensors), the final weights, and what the sharded top-K chose on tied scores.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import sparsetrain
from sparsetrain.app.checkpoint import load_sharded, save_sharded
from sparsetrain.app.distributed import shard_model
from sparsetrain.core.sharding import Part, is_sharded, top_k
from sparsetrain.models import build_model

SPARSITY = 0.8
METHODS = ("static", "set", "rigl", "mest", "swat", "swat-m")


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective when sharded: every rank calls it)."""
    return (t.full_tensor() if is_sharded(t) else t).detach().clone()


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "cnn":
        return build_model("small_cnn", 10, 0.5)
    return build_model("gpt", 17, 0.25, context=16, depth=2, heads=2)


def batch(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "cnn":
        return torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    tokens = torch.randint(0, 17, (4, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def sparsifier(method: str, kind: str, model, opt, steps: int):
    common = dict(sparsity=SPARSITY, distribution="erk")
    scheme = "unstructured" if kind == "cnn" else "fan_in"
    if method == "static":
        return sparsetrain.static(model, opt, init="magnitude", **common)
    if method == "set":
        return sparsetrain.set(model, opt, total_steps=steps, update_every_steps=10, **common)
    if method == "rigl":  # on the GPT, SRigL: constant fan-in with neuron ablation
        extra = {"neuron_ablation": 0.3} if scheme == "fan_in" else {}
        return sparsetrain.rigl(model, opt, total_steps=steps, update_every_steps=10, scheme=scheme, **extra, **common)
    if method == "mest":
        return sparsetrain.mest(
            model,
            opt,
            steps_per_epoch=10,
            epochs=steps // 10,
            every_epochs=1,
            soft_bound=True,
            mutation_ratio=[[0, 0.2]],
            excess=[[0, 0.05]],
            **common,
        )
    if method == "swat":
        return sparsetrain.swat(model, opt, sparsity=SPARSITY, total_steps=steps, topk_period=5)
    if method == "swat-m":  # budgets follow the momentum of each layer's kept weights (sums over ranks) at epoch ends
        return sparsetrain.swat(
            model, opt, sparsity=SPARSITY, variant="m", steps_per_epoch=20, epochs=steps // 20, topk_period=5
        )
    raise ValueError(method)


def masks_now(sp) -> dict[str, torch.Tensor]:
    if sp.name == "swat":
        return {n: whole(m.current_mask()) for n, m in sp.layers.items()}
    return {n: whole(m) for n, m in sp.maskset.masks.items()}


def train(
    kind: str,
    method: str,
    steps: int,
    sharded: bool,
    save: str | None = None,
    save_at: int | None = None,
    resume: str | None = None,
) -> dict:
    model = build(kind)
    if sharded:
        shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sp = sparsifier(method, kind, model, opt, steps)
    history, seen, start = [], None, 0
    if resume:
        load_sharded(f"{resume}/{method}", model, opt, sp)
        start, seen = sp.clock.step, sp.version
    for step in range(start, steps):
        x, y = batch(kind, step)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sp.version != seen:
            seen = sp.version
            history.append((step, masks_now(sp), sp.sparsity()))
        if save_at == step + 1:  # save and stop here, as a run that is killed after its checkpoint
            save_sharded(f"{save}/{method}", model, opt, sp)
            return {"history": history, "saved_at": step + 1}
    weights = {n: whole(p) for n, p in model.named_parameters()}
    held = [m.current_mask() for m in sp.layers.values()] if sp.name == "swat" else list(sp.maskset.masks.values())
    return {
        "history": history,
        "weights": weights,
        "updates": sp.summary().get("mask_updates"),
        "sharded_masks": sum(is_sharded(m) for m in held),
        "masks": len(held),
    }


def tie_selections(sharded: bool) -> list[torch.Tensor]:
    """top_k on integer scores (many ties), over a 7-row and a 1-row tensor (one rank's shard then is empty)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    out = []
    mesh = init_device_mesh("cpu", (int(os.environ.get("WORLD_SIZE", "1")),)) if sharded else None
    for rows, cols in ((7, 5), (1, 6)):
        scores = torch.randint(0, 4, (rows, cols), generator=torch.Generator().manual_seed(rows)).float()
        for k in (0, 1, 3, 9, rows * cols - 1, rows * cols):
            for largest in (True, False):
                if sharded:
                    t = distribute_tensor(scores, mesh, [Shard(0)])
                    part = Part.of(t)
                    chosen = part.wrap(top_k(t.to_local().reshape(-1), k, part, largest).reshape(t.to_local().shape))
                else:
                    chosen = top_k(scores.reshape(-1), k, None, largest).reshape(rows, cols)
                out.append(whole(chosen))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", choices=("cnn", "gpt"), default="cnn")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save", help="a sharded checkpoint directory to write at --save-at, then stop")
    ap.add_argument("--save-at", type=int)
    ap.add_argument("--resume", help="a sharded checkpoint directory to continue from")
    args = ap.parse_args()
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if sharded:
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {"ties": tie_selections(sharded)}
    for method in args.methods.split(","):
        result[method] = train(args.model, method, args.steps, sharded, args.save, args.save_at, args.resume)
    if not sharded or torch.distributed.get_rank() == 0:
        torch.save(result, args.out)
    if sharded:
        from sparsetrain.app.distributed import leave, shutdown

        shutdown()
        leave()


if __name__ == "__main__":
    main()
