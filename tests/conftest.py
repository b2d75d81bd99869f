"""Shared fixtures: small datasets the tests build themselves, and the shared CIFAR-10 copy where present."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache directory."""
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path / "cache"))


class _BackwardsClock:
    """A ``time`` module whose ``perf_counter`` runs backwards: every duration ``auto`` measures comes out negated,
    so whatever was fastest looks slowest and ``auto`` picks the slowest path everywhere."""

    @staticmethod
    def perf_counter() -> float:
        return -time.perf_counter()


@pytest.fixture(autouse=True)
def _timings_reversed_on_request(monkeypatch):
    """``SPARSETRAIN_TEST_TIMINGS=reversed``: ``auto``'s per-layer and whole-step timings come out in the reverse
    order, so that the tests marked ``timing`` show they assert nothing that real timings decide (the second step of
    ``.ci/run`` runs them so)."""
    if os.environ.get("SPARSETRAIN_TEST_TIMINGS") == "reversed":
        from sparsetrain.execution.backends import auto, layers

        monkeypatch.setattr(layers, "time", _BackwardsClock)
        monkeypatch.setattr(auto, "time", _BackwardsClock)


def make_image_tar(
    path: Path, n_train: int, n_test: int, size: int = 28, channels: int = 1, classes: int = 10, seed: int = 0
) -> Path:
    """A .tar of ROOT/{train,test}/<class>/NNNN.png; each class has a bright square in its own place (learnable)."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                c = i % classes
                arr = rng.integers(0, 60, (size, size, channels))
                r, q = 7 * (c % 4), 7 * (c // 4)
                arr[r : r + 7, q : q + 7] += 180  # a bright square whose place names the class
                arr = np.clip(arr, 0, 255).astype(np.uint8)
                img = Image.fromarray(arr[..., 0] if channels == 1 else arr)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                info = tarfile.TarInfo(f"tiny/{split}/class{c:02d}/{i:04d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return path


@pytest.fixture(scope="session")
def tiny_mnist_tar(tmp_path_factory) -> Path:
    """512 train and 128 test 28x28 grey images in 10 classes, as an image-folder tar."""
    return make_image_tar(tmp_path_factory.mktemp("data") / "tiny.tar", 512, 128)


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    """The real CIFAR-10 JPEG copy: $SPARSETRAIN_TEST_CIFAR, or ../shared/data beside the repository."""
    path = Path(os.environ.get("SPARSETRAIN_TEST_CIFAR", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar"))
    if not path.exists():
        pytest.skip(f"real CIFAR-10 copy not found at {path} (set SPARSETRAIN_TEST_CIFAR)")
    return path


def tiny_datasets(n_train=256, n_test=64, shape=(1, 28, 28), classes=10, seed=0):
    """In-memory datasets for engine tests (no files)."""
    from sparsetrain.data.images import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = torch.arange(n) % classes
        x = torch.randint(0, 60, (n, *shape), generator=g)
        for i, c in enumerate(y.tolist()):
            x[i, :, 7 * (c % 4) : 7 * (c % 4) + 7, 7 * (c // 4) : 7 * (c // 4) + 7] += 180
        x = x.clamp(0, 255).to(torch.uint8)
        out[split] = ArrayDataset(x, y, [str(c) for c in range(classes)])
    return out


def full_and_resumed(make_trainer, out_dir, stop_at_step: int):
    """Train once straight through, and once stopped by an exception after optimizer step
    ``stop_at_step`` and resumed from its last checkpoint; return both finished trainers."""
    from pathlib import Path

    full = make_trainer(Path(out_dir) / "full")
    full.fit()

    class Stop(Exception):
        pass

    cut = make_trainer(Path(out_dir) / "cut")
    real_post = cut.method.post_step

    def post():  # the method's work after optimizer step ``stop_at_step``, then the "kill"
        real_post()
        if cut.method.clock.step == stop_at_step:
            raise Stop

    cut.method.post_step = post
    with pytest.raises(Stop):
        cut.fit()
    resumed = make_trainer(Path(out_dir) / "cut")
    resumed.fit()
    return full, resumed


def keep_masked(maskset, optimizer) -> None:
    """The MaskSet's own exactness through ``optimizer.step()``, without a method around it: gradients masked before
    the update, weights and optimizer state after it (what every sparsifier's step hooks do)."""
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: maskset.mask_gradients())
    optimizer.register_step_post_hook(lambda opt, args, kwargs: maskset.apply(opt))


def train_steps(model, optimizer, batches) -> list[float]:
    """One cross-entropy training step per ``(x, y)`` of ``batches``; the losses."""
    import torch.nn.functional as F

    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def prefer_kernels(monkeypatch) -> None:
    """Inject every ``auto`` layer's own timings: its kernels three times faster than masked dense, so that a test
    needing the kernels chosen depends on no real timing."""
    from sparsetrain.execution.backends import layers as layers_module

    def injected_choose(self, x):
        self.timings = {name: (1.0 if name != "masked" else 3.0) for name in self.candidates(x)}
        self.backend = min(self.timings, key=self.timings.get)

    monkeypatch.setattr(layers_module._SparseExec, "_choose", injected_choose)
