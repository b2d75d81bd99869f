"""Sparse checkpoints (``st.save_sparse`` / ``st.load_sparse``): round trips equal to what was saved for every method,
files a fraction of the dense state dict's size, and crafted files refused in one line."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sparsetrain as st
from sparsetrain.app.artifact import FORMAT, SparseCheckpointError
from sparsetrain.models import build_model


def _trained(factory, **kw):
    torch.manual_seed(0)
    model = build_model("small_cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = factory(model, opt, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, sp


METHODS = {
    "static": (st.static, {"sparsity": 0.9}),
    "static-compact-direct": (st.static, {"sparsity": 0.9, "execution": "direct", "compact_state": True}),
    "rigl": (st.rigl, {"sparsity": 0.9, "total_steps": 8, "update_every_steps": 2}),
    "set": (st.set, {"sparsity": 0.9, "total_steps": 8, "update_every_steps": 2}),
    "mest": (st.mest, {"sparsity": 0.9, "steps_per_epoch": 2, "epochs": 4}),
    "swat": (st.swat, {"sparsity": 0.9, "total_steps": 8}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_round_trip_equals_what_was_saved_for_every_method(method, tmp_path):
    factory, kw = METHODS[method]
    model, sp = _trained(factory, **kw)
    saved = {k: v.clone() for k, v in sp.export_state().items()}
    path = st.save_sparse(sp, tmp_path / "m.safetensors")
    back = st.load_sparse(path)
    assert set(back) == set(saved)
    for k in saved:
        assert back[k].dtype == saved[k].dtype and torch.equal(back[k], saved[k]), k
    plain = sp.remove()
    fresh = build_model("small_cnn")
    st.load_sparse(path, fresh)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(fresh.eval()(x), plain.eval()(x))


def test_a_plain_model_is_stored_sparse_where_at_least_half_is_zeros_and_the_file_is_small(tmp_path):
    model, sp = _trained(st.static, sparsity=0.95)
    plain = sp.remove()
    path = st.save_sparse(plain, tmp_path / "m.safetensors")
    torch.save(plain.state_dict(), tmp_path / "dense.pt")
    sparse_names = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["sparse"])
    assert set(sparse_names) == {n for n in sp.maskset.masks}
    assert path.stat().st_size <= 0.15 * (tmp_path / "dense.pt").stat().st_size


def _refused(path) -> str:
    with pytest.raises(SparseCheckpointError) as e:
        st.load_sparse(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_crafted_files_are_refused_in_one_line(tmp_path):
    w = torch.randn(4, 8)
    keep = (torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5).reshape(-1)
    import numpy as np

    bits = torch.from_numpy(np.packbits(keep.numpy()))
    good = {"w::values": w.reshape(-1)[keep].clone(), "w::bits": bits}
    meta = {"format": FORMAT, "sparse": json.dumps({"w": {"shape": [4, 8], "dtype": "torch.float32"}})}

    def write(name, tensors, metadata):
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        return tmp_path / name

    assert torch.equal(st.load_sparse(write("ok", good, meta))["w"], w * keep.reshape(4, 8))
    wrong_shape = {"format": FORMAT, "sparse": json.dumps({"w": {"shape": [5, 8], "dtype": "torch.float32"}})}
    assert _refused(write("shape", good, wrong_shape)).endswith("w: a bitmask of 4 bytes for 40 positions")
    extra = {**good, "w::values": torch.cat([good["w::values"], torch.ones(1)])}
    assert "values (torch.float32) for" in _refused(write("count", extra, meta))
    past = {**good, "w::bits": torch.from_numpy(np.packbits(np.ones(32, bool)))}  # every bit: more than the values
    assert "kept positions" in _refused(write("past", past, meta))
    assert _refused(write("fmt", good, {"format": "other/9", "sparse": "{}"})).endswith(
        f"format 'other/9', not {FORMAT!r}"
    )
    torch.save({"w": w}, tmp_path / "pickle.pt")  # a pickle is never opened as one
    assert "not a safetensors file" in _refused(tmp_path / "pickle.pt")
