"""Character-level text: any UTF-8 file as next-character windows, split by position.

The vocabulary is the sorted set of the file's characters (saved with a run as ``vocab.json``, so a
trained model can be sampled later); the first ``1 - val_fraction`` of the text trains and the rest
validates; windows of ``context + 1`` characters start every ``stride`` characters (default: the
context, so training windows do not overlap) and give inputs ``w[:-1]`` and targets ``w[1:]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import DatasetError

__all__ = ["CharVocab", "CharWindows", "load_text"]


class CharVocab:
    """Characters to ids and back."""

    def __init__(self, chars: list[str]):
        if len(chars) < 2:
            raise DatasetError(f"a text needs at least 2 distinct characters, got {len(chars)}")
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Ids of ``text`` (a character outside the vocabulary is a ValueError naming it)."""
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise ValueError(f"characters not in the vocabulary: {missing[:10]}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        """The text of ``ids``."""
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps({"chars": self.chars}))

    @classmethod
    def load(cls, path: str | Path) -> "CharVocab":
        """Read a vocabulary written by :meth:`save`; a file of another shape is a DatasetError naming it."""
        try:
            chars = json.loads(Path(path).read_text(encoding="utf-8"))["chars"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(
                f"{path} is not a vocabulary file ({type(e).__name__}: {e}); it holds "
                '{"chars": [one character per id]}'
            ) from None
        if (
            not isinstance(chars, list)
            or not all(isinstance(c, str) and len(c) == 1 for c in chars)
            or len(set(chars)) != len(chars)
        ):
            raise DatasetError(f"{path} is not a vocabulary file: 'chars' must list distinct single characters")
        return cls(chars)


class CharWindows(Dataset):
    """Windows of ``context`` input ids and their ``context`` next-id targets, every ``stride`` ids.

    With ``shift`` (training), :meth:`set_epoch` moves every window by an offset in ``[0, stride)`` drawn
    from the seed and the epoch, so over epochs the windows start anywhere in the text, and a resumed
    run sees the same windows; the number of windows stays the same.
    """

    def __init__(self, ids: torch.Tensor, context: int, stride: int | None = None, shift: bool = False, seed: int = 0):
        self.stride = stride or context
        if len(ids) < context + 1 + (self.stride - 1 if shift else 0):
            raise DatasetError(f"{len(ids)} characters cannot fill one window of {context} + 1")
        self.ids, self.context, self.shift, self.seed = ids, context, shift, seed
        room = len(ids) - context - 1 - (self.stride - 1 if shift else 0)  # the last start that fits any offset
        self.count = room // self.stride + 1
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Shift the windows for ``epoch`` (no-op without ``shift``)."""
        if self.shift:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.offset = int(torch.randint(0, self.stride, (1,), generator=g))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if not 0 <= i < self.count:
            raise IndexError(i)
        s = self.offset + i * self.stride
        w = self.ids[s : s + self.context + 1]
        return w[:-1], w[1:]


def load_text(
    path: str | Path, context: int, val_fraction: float = 0.1, stride: int | None = None, seed: int = 0
) -> tuple[dict[str, CharWindows], CharVocab]:
    """``({"train", "test"}, vocab)`` of a UTF-8 text file; "test" is the held-out tail (validation, fixed
    windows); training windows every ``stride`` characters, shifted each epoch."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"text file {path} does not exist (pass it with --data-dir)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e})") from None
    if not 0 < val_fraction < 1:
        raise DatasetError(f"the validation share of a text must be in (0, 1), got {val_fraction}")
    vocab = CharVocab(sorted(set(text)))
    ids = vocab.encode(text)
    cut = int(len(ids) * (1 - val_fraction))
    train = CharWindows(ids[:cut], context, stride, shift=True, seed=seed)
    if len(ids) - cut < context + 1:
        raise DatasetError(
            f"the validation tail of {path} (data.val_fraction={val_fraction}: {len(ids) - cut} characters) "
            f"cannot fill one window of data.context={context} + 1; raise data.val_fraction, lower "
            "data.context, or use a longer text"
        )
    return {"train": train, "test": CharWindows(ids[cut:], context)}, vocab
