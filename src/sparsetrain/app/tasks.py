"""What the Trainer learns, as two task objects: image classification and language modelling. A task loads its
data, says whether a validation share is cut from the training set, gives the accounting an example input, names
the figures an epoch reports, and refuses what its inputs cannot take; the Trainer's loop is the same for both."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch

from ..data.images import DATASETS, TEXT_DATASETS, DatasetInfo, load_dataset
from ..data.text import CharVocab, load_text
from .config import Config, ConfigError
from .rundir import RunDirectory

__all__ = ["Task", "ImageClassification", "LanguageModelling", "make_task"]


class Task:
    """Image classification: one label per example; the test split is tested, a validation share validates."""

    name = "image-classification"
    vocab: CharVocab | None = None

    def __init__(self, info: DatasetInfo):
        self.info = info

    def holds_out_validation(self, cfg: Config) -> bool:
        """Whether ``data.val_fraction`` cuts a validation split from the training set."""
        return cfg.data.val_fraction > 0

    def accounting_example(self, train_set) -> torch.Tensor | None:
        """An input batch for the FLOP count (None: random inputs of the data's shape do)."""
        return None

    def eval_figures(self, test: dict[str, float]) -> dict[str, float]:
        """The record's figures for the held-out split's loss and accuracy."""
        return {"test_loss": test["loss"], "test_acc": test["acc"]}

    def shown(self, record: dict) -> str:
        """The epoch's figure on the progress line."""
        return f"test acc {record['test_acc']:.2f}%"

    def start(self, rundir: RunDirectory) -> None:
        """What a new run directory holds besides the configuration."""

    def check_method(self, kw: dict) -> None:
        """Refuse method arguments the task's inputs cannot take."""


class ImageClassification(Task):
    """Images and labels (CIFAR, MNIST, image folders)."""


class LanguageModelling(Task):
    """Next characters of a text: the file's tail validates (perplexity per character), token ids go in."""

    name = "language-modelling"

    def __init__(self, info: DatasetInfo, vocab: CharVocab):
        super().__init__(info)
        self.vocab = vocab

    def holds_out_validation(self, cfg: Config) -> bool:
        return False  # the text's tail is its held-out split already

    def accounting_example(self, train_set) -> torch.Tensor:
        return torch.stack([torch.as_tensor(train_set[i][0]) for i in range(2)])

    def eval_figures(self, test: dict[str, float]) -> dict[str, float]:
        return {"val_loss": test["loss"], "val_acc": test["acc"], "val_ppl": math.exp(min(test["loss"], 50.0))}

    def shown(self, record: dict) -> str:
        return f"val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"

    def start(self, rundir: RunDirectory) -> None:
        if rundir.is_main:
            rundir.write_text("vocab.json", json.dumps({"chars": self.vocab.chars}))  # what `sparsetrain sample` reads

    def check_method(self, kw: dict) -> None:
        if kw.get("init") == "synflow":
            raise ConfigError(
                "sparsity.init=synflow scores weights with an all-ones input, which a model of token "
                "ids does not take; use random, magnitude, snip or grasp for text"
            )


def make_task(cfg: Config, datasets: dict | None) -> tuple[Task, dict]:
    """The configured task and its splits (``datasets`` given from Python replace what the config would load)."""
    info = DATASETS[cfg.data.dataset]
    if datasets is None and cfg.data.dataset in TEXT_DATASETS:
        if cfg.data.data_dir is None:
            raise ConfigError("dataset 'text' reads a UTF-8 file: pass it with --data-dir (data.data_dir)")
        splits, vocab = load_text(
            cfg.data.data_dir, cfg.data.context, cfg.data.val_fraction or 0.1, cfg.data.stride, cfg.run.seed
        )
        return LanguageModelling(replace(info, num_classes=len(vocab), image_shape=(cfg.data.context,)), vocab), splits
    splits = datasets or load_dataset(
        cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download, cache_dir=cfg.data.cache_dir
    )
    missing = {"train", "test"} - set(splits)
    if missing:
        raise ValueError(f"datasets must hold 'train' and 'test' splits; missing {sorted(missing)}")
    return ImageClassification(info), splits
