"""Text and transformers: character windows, the zoo's GPT, the engine on a language model, every method on it."""

import json
import math

import pytest
import torch

from sparsetrain.app import Trainer
from sparsetrain.app.cli import main
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.data.images import DatasetError
from sparsetrain.data.text import CharVocab, load_text
from sparsetrain.models import build_model

WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    body = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (1200,), generator=g).tolist())
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(body + "\n")
    return path


TINY = [
    "data.dataset=text",
    "model.name=gpt",
    "model.width=0.25",
    "model.depth=1",
    "model.heads=2",
    "data.context=16",
    "optim.name=adamw",
    "optim.lr=3e-3",
    "optim.batch_size=16",
    "optim.epochs=2",
    "run.progress=false",
    "run.threads=1",
]


def test_windows_split_by_position_and_shift_targets(text):
    splits, vocab = load_text(text, context=16, val_fraction=0.1)
    raw = text.read_text()
    cut = int(len(raw) * 0.9)
    assert vocab.decode(torch.cat([splits["train"].ids, splits["test"].ids])) == raw
    assert len(splits["train"].ids) == cut
    x, y = splits["train"][3]
    assert x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert vocab.decode(x) == raw[48:64]
    assert CharVocab(vocab.chars).encode("to be").tolist() == vocab.encode("to be").tolist()


def test_text_errors_name_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin1.txt is not UTF-8"):
        load_text(tmp_path / "latin1.txt", 8)
    with pytest.raises(DatasetError, match="nope.txt does not exist"):
        load_text(tmp_path / "nope.txt", 8)
    (tmp_path / "short.txt").write_text("abcabc")
    with pytest.raises(DatasetError, match="cannot fill one window of 8"):
        load_text(tmp_path / "short.txt", 8)


def test_gpt_is_causal_and_generates():
    torch.manual_seed(0)
    model = build_model("gpt", 20, 0.25, context=12, depth=2, heads=2)
    x = torch.randint(0, 20, (2, 12))
    out = model(x)
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 20
    torch.testing.assert_close(model(x2)[:, :7], out[:, :7])  # no position sees the future
    assert not torch.allclose(model(x2)[:, 7:], out[:, 7:])
    assert model.generate(x[:, :3], 20).shape == (2, 23)  # beyond the context: the last 12 tokens feed it
    with pytest.raises(ValueError, match="longer than the model's context of 12"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_the_engine_trains_a_language_model_and_samples_from_it(text, tmp_path, capsys):
    cfg = load_config(overrides=[*TINY, f"data.data_dir={text}", f"run.out_dir={tmp_path}"])
    summary = Trainer(cfg).fit()
    vocab_size = len(CharVocab.load(tmp_path / "vocab.json"))
    assert summary["val_loss"] < math.log(vocab_size) - 0.5 and summary["val_ppl"] == pytest.approx(
        math.exp(summary["val_loss"])
    )
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < records[0]["val_loss"] and "test_acc" not in records[-1]
    assert main(["sample", str(tmp_path), "--prompt", "to be", "--chars", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("to be") and len(out.rstrip("\n")) >= 45 and set(out) <= set(text.read_text()) | {"\n"}


@pytest.mark.parametrize(
    "method",
    [
        ["sparsity.method=static"],
        ["sparsity.method=static", "sparsity.init=snip"],
        ["sparsity.method=static", "sparsity.init=grasp", "sparsity.global_ranking=true"],
        ["sparsity.method=set", "sparsity.update_every_steps=5"],
        ["sparsity.method=rigl", "sparsity.update_every_steps=5"],
        ["sparsity.method=mest", "sparsity.mest.every_epochs=1", "sparsity.mest.soft_bound=true"],
        ["sparsity.method=swat"],
        ["sparsity.method=static", "recipe.name=tost"],
    ],
    ids=["random", "snip", "grasp", "set", "rigl", "mest", "swat", "tost"],
)
def test_every_method_trains_the_gpt_with_attention_and_mlp_sparse(method, text, tmp_path):
    cfg = load_config(
        overrides=[
            *TINY,
            f"data.data_dir={text}",
            f"run.out_dir={tmp_path}",
            *method,
            "sparsity.sparsity=0.9",
            "sparsity.dense_layers=[last]",
            "sparsity.distribution=uniform" if "swat" not in method[0] else "sparsity.sparsity=0.9",
        ]
    )
    summary = Trainer(cfg).fit()
    layers = {ls["name"]: ls for ls in summary["layers"] if not ls["dense"]}
    assert set(layers) == {f"blocks.0.{n}.weight" for n in ("qkv", "proj", "fc", "out")}  # the head stays dense
    dense = {ls["name"] for ls in summary["layers"] if ls["dense"]}  # listed too, marked dense
    assert {"head.weight", "tok.weight", "pos.weight"} <= dense
    # SWAT reuses its top-K thresholds for topk_period steps while the weights move, so its density drifts a little
    assert summary["sparsity"] == pytest.approx(0.9, abs=0.05 if "swat" in method[0] else 5e-3)
    assert math.isfinite(summary["val_loss"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=gpt"], "model 'gpt' and dataset 'cifar10' do not fit"),
        (["data.dataset=text"], "model 'resnet20' and dataset 'text' do not fit"),
        (["model.depth=3"], "model.depth and model.heads shape the transformers"),
        (
            [*TINY, "sparsity.method=mest", "sparsity.sparsity=0.5", "sparsity.data_efficiency.enabled=true"],
            "not defined for text",
        ),
    ],
)
def test_models_and_data_that_do_not_fit_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_synflow_on_token_ids_is_refused(text, tmp_path):
    cfg = load_config(
        overrides=[
            *TINY,
            f"data.data_dir={text}",
            f"run.out_dir={tmp_path}",
            "sparsity.method=static",
            "sparsity.sparsity=0.9",
            "sparsity.init=synflow",
        ]
    )
    with pytest.raises(ConfigError, match="synflow.*token ids"):
        Trainer(cfg)


def test_training_windows_move_each_epoch_and_a_resume_sees_the_same(text, tmp_path):
    from conftest import full_and_resumed

    splits, _ = load_text(text, context=16, stride=8, seed=3)
    train = splits["train"]
    starts = []
    for epoch in range(4):
        train.set_epoch(epoch)
        x, _ = train[0]
        starts.append(train.offset)
        assert len(train) == train.count and torch.equal(x, train.ids[train.offset : train.offset + 16])
    assert len(set(starts)) > 1 and all(0 <= s < 8 for s in starts)
    last = train[len(train) - 1][1]
    assert len(last) == 16  # every window fits whatever the offset

    def make(out):
        return Trainer(
            load_config(
                overrides=[
                    *TINY,
                    f"data.data_dir={text}",
                    f"run.out_dir={out}",
                    "data.stride=8",
                    "optim.epochs=2",
                    "run.checkpoint_every_steps=5",
                ]
            )
        )

    full, resumed = full_and_resumed(make, tmp_path, 23)  # mid-epoch 2 (about 17 steps an epoch)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())


def test_the_cosine_floor_and_step_warmup(tmp_path):
    from sparsetrain.app.optim import lr_factor

    o = load_config(overrides=["optim.warmup_steps=100", "optim.min_lr_ratio=0.1"]).optim
    assert lr_factor(o, 0, 3000, 490) == pytest.approx(0.01) and lr_factor(o, 99, 3000, 490) == pytest.approx(1.0)
    assert lr_factor(o, 2999, 3000, 490) == pytest.approx(0.1, abs=1e-5)  # as the protocol's cosine to 1e-4 from 1e-3
