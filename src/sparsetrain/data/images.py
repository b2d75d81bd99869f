"""Datasets as uint8 tensors in memory, with batched augmentation.

Small image datasets (CIFAR, MNIST) fit in memory, so they are decoded once, cached
as uint8 tensors and augmented a whole batch at a time: no per-image PIL work and no
worker processes in the training loop.

Sources:
- CIFAR-10/100 from the official python archives (downloaded with checksum
  verification when absent), or from an image-folder tree
  ``ROOT/{train,test}/<class>/*.{png,jpg}`` or a .tar of one;
- MNIST and Fashion-MNIST from the official IDX files (.gz or raw).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.paths import default_cache_dir

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetError",
    "BatchLoader",
    "load_dataset",
    "download",
    "augment_batch",
    "split_validation",
]


class DatasetError(RuntimeError):
    """A dataset could not be found, fetched or decoded."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the library knows about a named dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding of the standard augmentation; 0 = none
    flip: bool


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), 0, False),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), 0, False),
    # any UTF-8 file as characters (sparsetrain.data.text): classes are the vocabulary, read from the file
    "text": DatasetInfo("text", 0, (0,), (), (), 0, False),
}
TEXT_DATASETS = {"text"}

# Official archives and their published MD5 checksums.
CIFAR_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
IDX_FILES = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
# Sizes of the official splits; the official formats (CIFAR python archives, IDX files) are checked against them.
SPLIT_SIZES = {
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
    "mnist": (60000, 10000),
    "fashion-mnist": (60000, 10000),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1


@dataclass
class ArrayDataset:
    """Images as a uint8 tensor ``[N, C, H, W]`` and labels as int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"images must be a uint8 [N, C, H, W] tensor, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        """The examples at ``index``, as a new dataset."""
        return ArrayDataset(self.images[index], self.labels[index], self.classes)


# --------------------------------------------------------------------------- download


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically and verify its MD5; a file already there and valid is kept.

    A failed or corrupt download leaves nothing at ``dest``.
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or _md5(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        if md5 is not None and (got := _md5(Path(tmp))) != md5:
            raise DatasetError(f"checksum mismatch for {url}: expected md5 {md5}, got {got}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DatasetError(
            f"could not download {url} ({e}). If this machine is offline, put the file in the data "
            f"directory yourself and pass it with --data-dir (expected at {dest})"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


# --------------------------------------------------------------------------- decoders


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts, strings and bytes and nothing else: a crafted
    archive cannot name a function to call (``os.system`` and friends are refused before anything runs)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only arrays, lists, dicts, strings and bytes")


def safe_unpickle(stream, where: str):
    """Unpickle ``stream`` with :class:`_ArraysOnly`; any failure is a DatasetError naming ``where``."""
    try:
        return _ArraysOnly(stream, encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError... all mean: not data we can trust
        raise DatasetError(f"{where}: not a data pickle ({type(e).__name__}: {e})") from None


def _decode_image(data: bytes, channels: int, where: str = "image") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{where}: not a readable image ({e})") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _from_files(files: list[tuple[str, str, str, bytes | Path]], channels: int) -> dict[str, ArrayDataset]:
    """Build train/test datasets from (split, class, file name, content); classes and files sort by name."""
    classes = sorted({c for _, c, _, _ in files})
    if not classes:
        raise DatasetError("no images found (expected ROOT/{train,test}/<class>/*.png|jpg)")
    out = {}
    for split in ("train", "test"):
        items = sorted(((c, name, content) for s, c, name, content in files if s == split), key=lambda t: t[:2])
        if not items:
            raise DatasetError(f"no images in the '{split}' split (expected ROOT/{split}/<class>/*.png|jpg)")
        imgs = [
            _decode_image(
                content if isinstance(content, bytes) else Path(content).read_bytes(),
                channels,
                f"{split}/{c}/{name}" if isinstance(content, bytes) else str(content),
            )
            for c, name, content in items
        ]
        shapes = {a.shape for a in imgs}
        if len(shapes) != 1:
            raise DatasetError(f"images in '{split}' differ in shape: {sorted(shapes)[:3]}")
        out[split] = ArrayDataset(
            torch.from_numpy(np.stack(imgs)), torch.tensor([classes.index(c) for c, _, _ in items]), classes
        )
    return out


def _split_and_class(parts: list[str]) -> tuple[str, str, str] | None:
    """For a path's parts ``.../{train,test}/<class>/<file>`` return (split, class, file)."""
    if len(parts) >= 3 and parts[-3] in ("train", "test") and parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return parts[-3], parts[-2], parts[-1]
    return None


def _open_tar(path: Path) -> tarfile.TarFile:
    """Open a tar archive; a file that is none is a DatasetError naming it. An uncompressed tar must end with
    its end-of-archive blocks: one cut at a member boundary would otherwise read as a smaller dataset."""
    try:
        tar = tarfile.open(path)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable tar archive ({e})") from None
    if tar.fileobj is not None and not str(path).endswith((".gz", ".tgz", ".bz2", ".xz")):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(size - 1024, 0))
            tail = f.read()
        if size < 1024 or tail.count(0) != len(tail):
            tar.close()
            raise DatasetError(f"{path}: truncated tar archive (no end-of-archive marker); copy it again")
    return tar


def _members(tar: tarfile.TarFile, path: Path):
    """The members of ``tar``; a truncated or corrupt archive is a DatasetError naming the file."""
    try:
        yield from tar
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: truncated or corrupt archive ({type(e).__name__}: {e})") from None


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> bytes:
    try:
        return tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}:{m.name}: truncated or corrupt member ({type(e).__name__}: {e})") from None


def read_image_folder(root: Path, channels: int = 3) -> dict[str, ArrayDataset]:
    """Read ``ROOT/{train,test}/<class>/*`` (a directory, or a .tar of one)."""
    root = Path(root)
    files: list[tuple[str, str, str, bytes | Path]] = []
    if root.is_file() and (root.suffix in (".tar", ".gz", ".tgz") or tarfile.is_tarfile(root)):
        with _open_tar(root) as tar:
            for m in _members(tar, root):
                if m.isfile() and (sc := _split_and_class(m.name.split("/"))):
                    files.append((*sc, _read_member(tar, m, root)))
    elif root.is_dir():
        for p in root.rglob("*"):
            if p.is_file() and (sc := _split_and_class(list(p.parts))):
                files.append((*sc, p))
    else:
        raise DatasetError(f"{root} is neither a directory nor a .tar archive")
    return _from_files(files, channels)


def read_cifar_archive(archive: Path, name: str) -> dict[str, ArrayDataset]:
    """Read the official CIFAR python archive (cifar-10-python.tar.gz / cifar-100-python.tar.gz)."""
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    batches = {"train": [], "test": []}
    classes: list[str] = []
    with _open_tar(archive) as tar:
        for m in _members(tar, archive):
            if not m.isfile():
                continue
            base = m.name.split("/")[-1]
            split = (
                "train"
                if base.startswith("data_batch") or base == "train"
                else "test"
                if base in ("test_batch", "test")
                else None
            )
            if base in ("batches.meta", "meta"):
                meta = safe_unpickle(tar.extractfile(m), f"{archive}:{m.name}")
                key = b"label_names" if b"label_names" in meta else b"fine_label_names"
                classes = [c.decode() for c in meta[key]]
            elif split:
                batches[split].append((base, safe_unpickle(tar.extractfile(m), f"{archive}:{m.name}")))
    out = {}
    for split, items in batches.items():
        if not items:
            raise DatasetError(f"{archive}: no {split} batches found; is this the official {name} python archive?")
        items.sort(key=lambda t: t[0])
        x = np.concatenate([d[b"data"] for _, d in items]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(d[label_key]) for _, d in items])
        out[split] = ArrayDataset(torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y).long(), classes)
    return out


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzip-compressed or raw."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DatasetError(f"{path}: damaged gzip file ({e}); download it again") from None
    if len(raw) < 4:
        raise DatasetError(f"{path}: not an IDX file ({len(raw)} bytes, shorter than its header)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DatasetError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(
            f"{path}: truncated IDX file (its header names {ndim} dimensions, the file ends before them)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return torch.from_numpy(data.reshape(dims).copy())


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.exists():
            return candidate
    return None


def read_idx_dataset(directory: Path) -> dict[str, ArrayDataset]:
    """MNIST-layout IDX files (train-*/t10k-*, .gz or raw) in ``directory``."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        paths = [_find(directory, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
        if None in paths:
            raise DatasetError(
                f"{directory}: {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] are needed"
            )
        images, labels = (read_idx(p) for p in paths)
        out[split] = ArrayDataset(images[:, None].contiguous(), labels.long(), [str(i) for i in range(10)])
    return out


# --------------------------------------------------------------------------- entry point


def _cache_key(source: Path) -> str:
    """Path, size and modification time of the source: of the file, or of every file in the folder (a file
    changed, added or removed inside a folder changes the key, so a stale cache is never served)."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    ident = f"{source.resolve()}|{CACHE_VERSION}|" + "|".join(
        f"{p.relative_to(source) if p != source else ''}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files
    )
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def check_splits(splits: dict[str, ArrayDataset], name: str, source: Path, official_format: bool) -> None:
    """Refuse data that would train silently wrong: labels outside [0, classes), a single class, or an
    official format (CIFAR archive, IDX files) whose split sizes are not the published ones."""
    info = DATASETS[name]
    for split, d in splits.items():
        if len(d) == 0:
            raise DatasetError(f"{source}: the {split} split is empty")
        lo, hi = int(d.labels.min()), int(d.labels.max())
        if lo < 0 or hi >= info.num_classes:
            raise DatasetError(
                f"{source}: {split} labels span {lo}..{hi}; {name} has classes 0..{info.num_classes - 1}"
            )
    present = int(splits["train"].labels.unique().numel())
    if present < 2:
        raise DatasetError(
            f"{source}: the training split holds {present} class; at least 2 are needed to learn anything"
        )
    if official_format and name in SPLIT_SIZES:
        sizes = (len(splits["train"]), len(splits["test"]))
        if sizes != SPLIT_SIZES[name]:
            raise DatasetError(
                f"{source}: {sizes[0]} training and {sizes[1]} test examples; the official {name} has "
                f"{SPLIT_SIZES[name][0]} and {SPLIT_SIZES[name][1]} (truncated or partial files?)"
            )


def _locate_source(name: str, data_dir: Path, allow_download: bool, url_base: str | None) -> Path:
    """Find (or fetch) the file or folder holding ``name`` under ``data_dir``."""
    if data_dir.is_file():
        if name in CIFAR_ARCHIVES and data_dir.name == CIFAR_ARCHIVES[name][0].rsplit("/", 1)[1]:
            md5 = CIFAR_ARCHIVES[name][1]
            if (got := _md5(data_dir)) != md5:  # verified before anything in it is unpickled
                raise DatasetError(
                    f"{data_dir}: checksum mismatch (md5 {got}, the official archive has {md5}); "
                    "refusing to read it: fetch the archive again"
                )
        return data_dir
    if name in CIFAR_ARCHIVES:
        url, md5 = CIFAR_ARCHIVES[name]
        archive = data_dir / url.rsplit("/", 1)[1]
        if archive.exists() or not (data_dir / "train").is_dir():
            if url_base:
                url = url_base.rstrip("/") + "/" + archive.name
            if not allow_download:  # never downloads, not even to replace a damaged copy
                if not archive.exists():
                    raise DatasetError(
                        f"{archive} not found and downloading is off; pass the folder that holds it with --data-dir"
                    )
                if (got := _md5(archive)) != md5:
                    raise DatasetError(
                        f"{archive}: checksum mismatch (md5 {got}, the official archive has {md5}) and "
                        "downloading is off; fetch the archive again"
                    )
                return archive
            return download(url, archive, md5)
        return data_dir
    base, files = IDX_FILES[name]
    if _find(data_dir, "train-images-idx3-ubyte") is None and not (data_dir / "train").is_dir():
        if not allow_download:
            raise DatasetError(
                f"no IDX files in {data_dir} and downloading is off; pass the folder that holds them with --data-dir"
            )
        for fname, md5 in files.items():
            download((url_base.rstrip("/") + "/" if url_base else base) + fname, data_dir / fname, md5)
    return data_dir


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    url_base: str | None = None,
) -> dict[str, ArrayDataset]:
    """Load ``name`` as ``{"train": ArrayDataset, "test": ArrayDataset}``.

    ``data_dir`` may be a folder (holding the official archive/IDX files, or an
    image-folder tree), or a file (the archive, or a .tar of an image-folder tree).
    Decoded tensors are cached in ``cache_dir`` (default ``~/.cache/sparsetrain``)
    keyed by the source's path, size and mtime, so decoding happens once.
    ``url_base`` replaces the official download address (mirrors, tests).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_cache_dir() / "data" / name
    if not data_dir.exists():
        if data_dir.suffix or not download:  # a misspelled path is never created
            raise DatasetError(
                f"data path {data_dir} does not exist; pass an existing file or folder with --data-dir"
                f"{'' if data_dir.suffix else ' (or allow downloading with data.download=true)'}"
            )
        data_dir.mkdir(parents=True, exist_ok=True)  # downloading into it
    source = _locate_source(name, data_dir, download, url_base)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{name}-{_cache_key(source)}.pt"
    if cache_file.exists():
        try:
            blob = torch.load(cache_file, weights_only=True)
            return {s: ArrayDataset(blob[s + "_x"], blob[s + "_y"], list(blob["classes"])) for s in ("train", "test")}
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    channels = DATASETS[name].image_shape[0]
    official = True
    if source.is_file() and name in CIFAR_ARCHIVES and source.name.endswith(".tar.gz") and "python" in source.name:
        splits = read_cifar_archive(source, name)
    elif name in IDX_FILES and source.is_dir() and _find(source, "train-images-idx3-ubyte"):
        splits = read_idx_dataset(source)
    else:
        splits, official = read_image_folder(source, channels), False
    check_splits(splits, name, source, official)
    got = tuple(splits["train"].images.shape[1:])
    if got != DATASETS[name].image_shape:
        raise DatasetError(f"{source}: images are {got}, {name} expects {DATASETS[name].image_shape}")
    blob = {f"{s}_{k}": getattr(d, a) for s, d in splits.items() for k, a in (("x", "images"), ("y", "labels"))}
    blob["classes"] = splits["train"].classes
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        os.close(fd)
        torch.save(blob, tmp)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # an unwritable cache only costs decoding time
    return splits


def split_validation(train: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Hold ``fraction`` of ``train`` out as a validation set, the same for a given seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train), generator=g)
    n_val = max(1, round(fraction * len(train)))
    keep, held = perm[n_val:].sort().values, perm[:n_val].sort().values
    if isinstance(train, ArrayDataset):
        return train.subset(keep), train.subset(held)
    from torch.utils.data import Subset

    return Subset(train, keep.tolist()), Subset(train, held.tolist())


# --------------------------------------------------------------------------- batches


def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8 batch ``[N, C, H, W]``, all at once."""
    n, _, h, w = x.shape
    if padding:
        xp = torch.nn.functional.pad(x, (padding,) * 4)
        i = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        j = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (i[:, None] + torch.arange(h))[:, None, :, None]
        cols = (j[:, None] + torch.arange(w))[:, None, None, :]
        x = xp[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class BatchLoader:
    """Deterministic, resumable batches of a dataset held in memory (uint8 image arrays, augmented and
    normalised here: the fast path), or of any map-style ``torch.utils.data.Dataset`` of
    ``(input tensor, label)`` items, stacked as they come (their own transforms apply).

    Every rank of a data-parallel job builds the same global batch (same permutation,
    same augmentation) and takes its own slice, so a job on R ranks sees exactly the
    data that one process with the global batch would. The state (epoch, position,
    generator) goes in checkpoints, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        dataset: "ArrayDataset | torch.utils.data.Dataset",
        info: DatasetInfo | None,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        drop_last: bool = False,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world_size}")
        self.dataset, self.info, self.batch_size = dataset, info, batch_size
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.channels_last, self.drop_last = channels_last, drop_last
        if info is not None:
            self.mean = torch.tensor(info.mean).view(1, -1, 1, 1) * 255
            self.std = torch.tensor(info.std).view(1, -1, 1, 1) * 255
        elif isinstance(dataset, ArrayDataset):
            raise ValueError("uint8 image arrays need the dataset's info (mean, std, augmentation)")
        self.epoch, self.position = 0, 0
        self.generator = torch.Generator()
        self._perm: torch.Tensor | None = None
        self.active: torch.Tensor | None = None  # indices still trained on (None: all)

    def __len__(self) -> int:
        n = len(self.dataset) if self.active is None else len(self.active)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_active(self, indices: torch.Tensor | None) -> None:
        """Train on these example indices only, from the next epoch on (None: all of them)."""
        self.active = None if indices is None else indices.to(torch.long)

    def start_epoch(self, epoch: int) -> None:
        """Fix the order and augmentation stream of ``epoch`` (a function of the seed and epoch only)."""
        self.epoch, self.position = epoch, 0
        if self.train and hasattr(self.dataset, "set_epoch"):  # datasets whose items move with the epoch (text windows)
            self.dataset.set_epoch(epoch)
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        pool = torch.arange(len(self.dataset)) if self.active is None else self.active
        self._perm = pool[torch.randperm(len(pool), generator=self.generator)] if self.train else pool

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images to the model's float input (items of a generic dataset pass as they are)."""
        if not isinstance(self.dataset, ArrayDataset):
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x
        out = (x.float() - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self):
        """Yield ``(inputs, labels, indices)`` for this rank, from the current position to the epoch's end."""
        if self._perm is None:
            self.start_epoch(self.epoch)
        while self.position < len(self):
            idx = self._perm[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            self.position += 1
            if not isinstance(self.dataset, ArrayDataset):  # any map-style dataset of (input, label) items
                if self.world_size > 1:
                    idx = idx.tensor_split(self.world_size)[self.rank]
                items = [self.dataset[int(i)] for i in idx]
                x = torch.stack([torch.as_tensor(it[0]) for it in items])
                y = torch.stack([torch.as_tensor(it[1]) for it in items]).long()  # a label, or a target per position
                yield self.normalize(x), y, idx
                continue
            x = self.dataset.images[idx]
            if self.train:
                x = augment_batch(x, self.info.crop_padding, self.info.flip, self.generator)
            if self.world_size > 1:
                idx, x = idx.tensor_split(self.world_size)[self.rank], x.tensor_split(self.world_size)[self.rank]
            yield self.normalize(x), self.dataset.labels[idx], idx

    def state_dict(self) -> dict:
        """Epoch, position, generator and order: enough to continue the epoch exactly."""
        empty = torch.empty(0, dtype=torch.long)
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self.generator.get_state(),
            "perm": self._perm if self._perm is not None else empty,
            "active": self.active if self.active is not None else empty,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"])
        self._perm = state["perm"] if state["perm"].numel() else None
        self.active = state["active"] if state["active"].numel() else None
        if self.train and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
