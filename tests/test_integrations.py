"""The Hugging Face and Lightning callbacks: real trainers, masks exact at every logged step, bit-identical resume."""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st

transformers = pytest.importorskip("transformers")
L = pytest.importorskip("lightning")
REPO = Path(__file__).resolve().parent.parent


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _assert_masks_exact(sp, model):
    params = dict(model.named_parameters())
    for n, m in sp.maskset.masks.items():
        assert torch.count_nonzero(params[n].detach()[~m]) == 0, n


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small text with structure (the shared tiny-Shakespeare is for the real example run)."""
    words = ["thou", "art", "the", "king", "and", "queen", "of", "all", "that", "is", "fair", "good", "night"]
    g = torch.Generator().manual_seed(0)
    body = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(body)
    return path


HF_SMALL = ["--chars", "6000", "--context", "16", "--width", "32", "--heads", "2", "--batch", "8", "--log-every", "10"]


def test_hugging_face_example_trains_mest_with_exact_masks_at_every_log(text, tmp_path):
    hf = _example("huggingface_gpt2")
    args = hf.parser().parse_args(
        ["--text", str(text), "--out", str(tmp_path), "--steps", "300", "--save-every", "1000", *HF_SMALL]
    )
    trainer, callback = hf.build(args)
    logged = []

    class Check(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            sp = callback.sparsifier
            _assert_masks_exact(sp, trainer.model)
            logged.append((state.global_step, sp.sparsity()))

    trainer.add_callback(Check())
    result = trainer.train()
    sp = callback.sparsifier
    assert len(logged) >= 30 and all(s == pytest.approx(0.9, abs=1e-3) for _, s in logged)
    assert sp.clock.step == 300 and sp.updates >= 2  # mutations at epoch ends (epochs of 46 steps)
    assert result.training_loss < 2.5  # it learns the words
    layers = [ls.name for ls in sp.report()]
    assert "lm_head.weight" not in layers and any(n.endswith("attn.c_attn.weight") for n in layers)


class _MLP(nn.Module):
    """A model of the user's for the HF Trainer: returns {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _Points(torch.utils.data.Dataset):
    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
        self.x[torch.arange(n), self.y] += 2

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


HF_METHODS = {
    "rigl": functools.partial(st.rigl, sparsity=0.8, update_every_steps=4, dense_layers=[]),
    "mest": functools.partial(st.mest, sparsity=0.8, every_epochs=1, dense_layers=[]),
    "swat": functools.partial(st.swat, sparsity=0.8, topk_period=3),
}


class _Kill(Exception):
    pass


def _no_timing(monkeypatch):
    """From here on, a plan that would be timed fails the test: a resumed run must apply the plan it saved."""

    def fail(*args, **kwargs):
        raise AssertionError("the resumed run timed its execution plan again")

    monkeypatch.setattr("sparsetrain.execution.plan.Planner.choose", fail)


@pytest.mark.timing
@pytest.mark.parametrize("name", sorted(HF_METHODS))
def test_hugging_face_resume_from_checkpoint_is_bit_identical(name, tmp_path, monkeypatch):
    """With ``execution="auto"``: the full run times its plan; the cut run takes that plan (so both compute alike);
    the resumed run asks for ``auto`` again and gets the saved plan back without timing."""
    from sparsetrain.integrations.huggingface import STATE_FILE, SparsityCallback

    def run(out, kill_at=None, resume=False, execution="auto", sparse=False):
        torch.manual_seed(0)
        model = _MLP()
        args = transformers.TrainingArguments(
            output_dir=str(out),
            num_train_epochs=3,
            per_device_train_batch_size=32,
            learning_rate=1e-2,
            save_steps=5,
            logging_steps=5,
            report_to="none",
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        keep = (lambda sp, folder: st.save_sparse(sp, folder / "model.sparse.safetensors")) if sparse else None
        callback = SparsityCallback(HF_METHODS[name], execution=execution, on_checkpoint=keep)
        callbacks = [callback]
        if kill_at:

            class Kill(transformers.TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if state.global_step == kill_at:
                        raise _Kill

            callbacks.append(Kill())
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Points(), callbacks=callbacks)
        if kill_at:
            with pytest.raises(_Kill):
                trainer.train()
            return None
        trainer.train(resume_from_checkpoint=True if resume else None)
        return model, callback.sparsifier

    full, sp = run(tmp_path / "full", sparse=True)
    assert sp.plan is not None and sp.plan.requested == "auto"
    saved = st.load_sparse(tmp_path / "full" / "checkpoint-24" / "model.sparse.safetensors")  # by on_checkpoint
    assert saved.keys() == sp.export_state().keys()
    assert all(torch.equal(v, saved[k]) for k, v in sp.export_state().items())
    run(
        tmp_path / "cut", kill_at=13, execution=sp.plan
    )  # 8 steps an epoch: killed in epoch 2, after step 10's checkpoint
    assert (tmp_path / "cut" / "checkpoint-10" / STATE_FILE).exists()
    _no_timing(monkeypatch)
    resumed, sp2 = run(tmp_path / "cut", resume=True)
    assert sp2.plan == sp.plan  # restored, not timed again
    assert sp2.clock.step == sp.clock.step == 24
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    if name != "swat":
        assert sp.updates == sp2.updates > 0
        assert all(torch.equal(m, sp2.maskset.masks[n]) for n, m in sp.maskset.masks.items())


def test_lightning_example_trains_rigl_with_exact_masks_at_every_logged_step(tmp_path):
    lx = _example("lightning_resnet")
    args = lx.parser().parse_args(
        [
            "--data",
            "synthetic",
            "--limit",
            "512",
            "--batch",
            "16",
            "--width",
            "0.25",
            "--epochs",
            "8",
            "--update-every",
            "10",
            "--out",
            str(tmp_path),
        ]
    )
    trainer, module, loader, callback = lx.build(args)
    seen = []

    class Check(L.pytorch.callbacks.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 10 == 0:
                _assert_masks_exact(callback.sparsifier, pl_module)
                seen.append(callback.sparsifier.sparsity())

    trainer.callbacks.append(Check())
    trainer.fit(module, loader)
    sp = callback.sparsifier
    assert sp.clock.step == 256 and sp.updates >= 10 and len(seen) >= 25
    assert all(s == pytest.approx(0.9, abs=1e-3) for s in seen)
    assert (tmp_path / "last.ckpt").exists()


class _LitCNN(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


LIGHTNING_METHODS = {
    "rigl": functools.partial(st.rigl, sparsity=0.8, update_every_steps=3),
    "mest": functools.partial(st.mest, sparsity=0.8, every_epochs=1),
    "swat": functools.partial(st.swat, sparsity=0.8, topk_period=3),
}


@pytest.mark.timing
@pytest.mark.parametrize("name", sorted(LIGHTNING_METHODS))
def test_lightning_resume_from_ckpt_path_is_bit_identical(name, tmp_path, monkeypatch):
    """As the Hugging Face test: ``execution="auto"``, the cut run on the full run's plan, the resumed run not timing."""
    from sparsetrain.integrations.lightning import SparsityCallback
    from sparsetrain.recipes import KeptSampler

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(
        torch.randn(128, 3, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g)
    )

    def run(out, kill_in_epoch=None, ckpt=None, execution="auto"):
        L.seed_everything(0, verbose=False)
        module = _LitCNN()
        callback = SparsityCallback(LIGHTNING_METHODS[name], execution=execution)
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=out, save_last=True, save_top_k=1, save_on_train_epoch_end=True
        )
        callbacks = [callback, checkpoints]
        if kill_in_epoch is not None:

            class Kill(L.pytorch.callbacks.Callback):
                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    if trainer.current_epoch == kill_in_epoch and batch_idx == 2:
                        raise _Kill

            callbacks.append(Kill())
        trainer = L.Trainer(
            max_epochs=3,
            accelerator="cpu",
            devices=1,
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
            deterministic=True,
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=KeptSampler(len(ds), seed=0))
        if kill_in_epoch is not None:
            with pytest.raises(_Kill):
                trainer.fit(module, loader)
            return None
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module, callback.sparsifier

    full, sp = run(tmp_path / "full")
    assert sp.plan is not None and sp.plan.requested == "auto"
    run(tmp_path / "cut", kill_in_epoch=2, execution=sp.plan)  # the last checkpoint is the end of epoch 2 (step 16)
    _no_timing(monkeypatch)
    resumed, sp2 = run(tmp_path / "cut2", ckpt=str(tmp_path / "cut" / "last.ckpt"))
    assert sp2.plan == sp.plan  # restored, not timed again
    assert sp2.clock.step == sp.clock.step == 24
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    if name != "swat":
        assert sp.updates == sp2.updates > 0
        assert all(torch.equal(m, sp2.maskset.masks[n]) for n, m in sp.maskset.masks.items())
