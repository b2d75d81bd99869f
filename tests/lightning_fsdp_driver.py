"""RigL in a Lightning Trainer, alone or sharded by Lightning's FSDP2 strategy (``ModelParallelStrategy`` on 2 CPU
processes, which Lightning starts itself); every rank reads every batch (no distributed sampler), so the sharded
run must end with the masks of the single one. Rank 0 saves the whole masks and weights to ``argv[1]``.

    python tests/lightning_fsdp_driver.py OUT.pt 1     # one process
    python tests/lightning_fsdp_driver.py OUT.pt 2     # two ranks, FSDP2
"""

import sys
from functools import partial

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.core.sharding import is_sharded
from sparsetrain.integrations.lightning import SparsityCallback


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def configure_model(self):
        if self.device_mesh is not None:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(out: str, ranks: int) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 20, generator=g), torch.randint(0, 4, (256,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    cb = SparsityCallback(partial(st.rigl, sparsity=0.8, update_every_steps=4))
    kw = {}
    if ranks > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        kw = {"strategy": ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1)}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=ranks,
        max_epochs=2,
        callbacks=[cb],
        use_distributed_sampler=False,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kw,
    )
    module = Net()
    trainer.fit(module, loader)
    sp = cb.sparsifier
    whole = lambda t: (t.full_tensor() if is_sharded(t) else t).detach().clone()  # noqa: E731
    masks = {n: whole(m) for n, m in sp.maskset.masks.items()}
    weights = {n: whole(p) for n, p in module.named_parameters()}
    sharded = all(is_sharded(m) for m in sp.maskset.masks.values())
    if trainer.global_rank == 0:
        torch.save({"masks": masks, "weights": weights, "updates": sp.updates, "sharded": sharded}, out)
    if torch.distributed.is_initialized():
        # every rank leaves the group before exiting: gloo's threads outliving it can abort the process at exit
        # ("terminate called without an active exception") after the run itself has finished
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
