"""RigL in a plain PyTorch loop, really sparse: a model of your own, AdamW, nothing else from the library.

python examples/custom_loop.py            # the plan, then the loss and the sparsity every epoch (seconds)
"""

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st


def main(argv=None) -> dict:
    epochs = int((argv if argv is not None else sys.argv[1:] or ["3"])[0])
    torch.manual_seed(0)
    x, y = torch.randn(512, 20), torch.randint(0, 4, (512,))  # your data
    x[torch.arange(512), y] += 3  # (learnable)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps_per_epoch = 512 // 32
    sp = st.rigl(
        model,
        optimizer,
        sparsity=0.9,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        update_every_steps=10,
        execution="condensed",  # the Linear kernels; "auto" times every path (at this batch of 32 it keeps masked)
        compact_state=True,  # the sparse layers store only their kept weights and those weights' AdamW moments
    )  # the first and last layers stay dense (dense_layers=("first", "last"), the default)
    for epoch in range(epochs):
        for i in torch.randperm(512).split(32):
            loss = F.cross_entropy(model(x[i]), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # RigL's updates happen in here
        if epoch == 0:
            print(sp.plan)  # per layer: backend, compact or not
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, sparsity {sp.sparsity():.3f}")
    path = Path(tempfile.mkdtemp(prefix="sparsetrain-")) / "custom_loop.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sparsity": sp.state_dict()}, path
    )  # resume: build the three again, load sparsity first
    print(f"checkpoint (plan included): {path}")
    plain = sp.remove()  # hooks gone, masks applied: a plain nn.Module
    return {
        "loss": loss.item(),
        "sparsity": sp.sparsity(),
        "updates": sp.updates,
        "model": plain,
        "plan": sp.plan,
        "checkpoint": path,
    }


if __name__ == "__main__":
    main()
