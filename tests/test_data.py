import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.data import images as D
from sparsetrain.data.images import (
    DATASETS,
    BatchLoader,
    DatasetError,
    augment_batch,
    load_dataset,
    read_idx,
    split_validation,
)


def make_cifar_archive(path: Path, n_per_batch: int = 20) -> Path:
    """A miniature of the official cifar-10-python.tar.gz: 5 data batches, a test batch, meta."""
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as tar:

        def add(name, obj):
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        add("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
        for i in range(1, 6):
            add(
                f"data_batch_{i}",
                {
                    b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                    b"labels": list(rng.integers(0, 10, n_per_batch)),
                },
            )
        add(
            "test_batch",
            {
                b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                b"labels": list(rng.integers(0, 10, n_per_batch)),
            },
        )
    return path


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/'served' on 127.0.0.1 at a free port."""
    root = tmp_path / "served"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_image_folder_tar_and_directory_agree(tiny_mnist_tar, tmp_path):
    from_tar = load_dataset("mnist", tiny_mnist_tar)
    assert from_tar["train"].images.shape == (512, 1, 28, 28) and from_tar["test"].images.shape == (128, 1, 28, 28)
    assert from_tar["train"].images.dtype == torch.uint8
    assert from_tar["train"].classes == [f"class{c:02d}" for c in range(10)]
    with tarfile.open(tiny_mnist_tar) as tar:
        tar.extractall(tmp_path / "x")
    from_dir = load_dataset("mnist", tmp_path / "x" / "tiny", cache_dir=tmp_path / "c2")
    assert torch.equal(from_dir["train"].images, from_tar["train"].images)
    assert torch.equal(from_dir["test"].labels, from_tar["test"].labels)


def test_decoded_once_then_cached(tiny_mnist_tar, tmp_path, monkeypatch):
    load_dataset("mnist", tiny_mnist_tar, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("mnist-*.pt"))) == 1
    monkeypatch.setattr(D, "read_image_folder", lambda *a, **k: pytest.fail("decoded again"))
    again = load_dataset("mnist", tiny_mnist_tar, cache_dir=tmp_path / "c")
    assert len(again["train"]) == 512


def test_cifar_download_from_local_server_verifies_checksum(http_server, tmp_path, monkeypatch):
    root, url = http_server
    archive = make_cifar_archive(root / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10", (url + "/cifar-10-python.tar.gz", md5))
    monkeypatch.setitem(D.SPLIT_SIZES, "cifar10", (100, 20))  # the miniature's split sizes
    splits = load_dataset("cifar10", tmp_path / "data")
    assert splits["train"].images.shape == (100, 3, 32, 32)
    assert splits["test"].images.shape == (20, 3, 32, 32)
    assert splits["train"].classes[0] == "c0"
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").exists()


def test_download_checksum_mismatch_leaves_nothing(http_server, tmp_path, monkeypatch):
    root, url = http_server
    make_cifar_archive(root / "cifar-10-python.tar.gz")
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10", (url + "/cifar-10-python.tar.gz", "0" * 32))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset("cifar10", tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_offline_download_names_data_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10", ("http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32))
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("cifar10", tmp_path / "data")


def test_download_off_names_data_dir(tmp_path):
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("cifar10", tmp_path / "data", download=False)


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_mnist_idx_gz_and_raw(tmp_path, monkeypatch):
    monkeypatch.setitem(D.SPLIT_SIZES, "fashion-mnist", (30, 10))  # the miniature's split sizes
    rng = np.random.default_rng(0)
    for prefix, n, compress in (("train", 30, True), ("t10k", 10, False)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            raw = _idx(arr)
            name = f"{prefix}-{kind}-idx{dims}-ubyte"
            if compress:
                (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (tmp_path / name).write_bytes(raw)
    splits = load_dataset("fashion-mnist", tmp_path)
    assert splits["train"].images.shape == (30, 1, 28, 28) and splits["test"].images.shape == (10, 1, 28, 28)


def test_truncated_idx_is_refused(tmp_path):
    p = tmp_path / "t.idx"
    p.write_bytes(_idx(np.zeros((5, 28, 28), np.uint8))[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(p)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet7'.*cifar10"):
        load_dataset("imagenet7")


def test_augmentation_is_batched_deterministic_and_a_crop():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    a = augment_batch(x, 4, True, torch.Generator().manual_seed(3))
    b = augment_batch(x, 4, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.uint8
    # with no padding and no flip the batch is unchanged
    assert torch.equal(augment_batch(x, 0, False, torch.Generator()), x)
    # every output is a shifted (and possibly flipped) window of the zero-padded input
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for k in range(8):
        windows = [xp[k, :, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(a[k], w) or torch.equal(a[k], w.flip(2)) for w in windows)


def test_loader_order_is_deterministic_and_resumable():
    ds = D.ArrayDataset(torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8), torch.arange(50) % 10)
    info = DATASETS["cifar10"]
    a = BatchLoader(ds, info, 8, train=True, seed=5)
    a.start_epoch(2)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    rest = list(it)
    b = BatchLoader(ds, info, 8, train=True, seed=5)
    b.load_state_dict(state)
    resumed = list(b)
    assert len(rest) == len(resumed) == 4
    for (x1, y1, i1), (x2, y2, i2) in zip(rest, resumed):
        assert torch.equal(x1, x2) and torch.equal(i1, i2)
    assert sorted(torch.cat([i for _, _, i in first + rest]).tolist()) == list(range(50))


def test_ranks_take_disjoint_slices_of_the_same_global_batch():
    ds = D.ArrayDataset(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.arange(40) % 10)
    info = DATASETS["cifar10"]
    whole = BatchLoader(ds, info, 8, train=True, seed=1)
    parts = [BatchLoader(ds, info, 8, train=True, seed=1, rank=r, world_size=2) for r in range(2)]
    for (xw, _, iw), (x0, _, i0), (x1, _, i1) in zip(whole, *parts):
        assert torch.equal(torch.cat([i0, i1]), iw) and torch.equal(torch.cat([x0, x1]), xw)


def test_validation_split_is_disjoint_and_seeded():
    ds = D.ArrayDataset(torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8), torch.arange(100))
    tr, va = split_validation(ds, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80
    assert set(tr.labels.tolist()).isdisjoint(va.labels.tolist())
    assert torch.equal(split_validation(ds, 0.2, seed=3)[1].labels, va.labels)


def test_shared_cifar10_copy_loads(shared_cifar):
    splits = load_dataset("cifar10", shared_cifar)
    assert splits["train"].images.shape == (50000, 3, 32, 32) and splits["test"].images.shape == (10000, 3, 32, 32)
    assert splits["train"].classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.bincount(splits["train"].labels).tolist() == [5000] * 10
    mean = splits["train"].images.float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=1e-3)
