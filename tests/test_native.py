"""The fused C kernels agree bit for bit with the numpy/torch reference, and their absence is survivable."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparsetrain.execution import native
from sparsetrain.execution.activations import BitReLU
from sparsetrain.execution.backends import swat

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no C compiler: the numpy path is used and tested elsewhere"
)

# sizes around byte and chunk (65536) boundaries
SIZES = [1, 7, 8, 9, 65535, 65536, 65537, 3 * 65536 + 13]


def _packed(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))


@pytest.fixture(scope="session")
def portable_library(tmp_path_factory):
    """The kernels built without CPU tuning: the SSE2 paths a CPU without AVX-512 takes."""
    path = tmp_path_factory.mktemp("native") / "portable.so"
    native._build(path, portable=True)
    return native._open(path)


@pytest.fixture(params=["tuned", "portable"])
def build(request, monkeypatch, portable_library):
    """Each kernel test runs on this CPU's tuned build and on the portable one."""
    if request.param == "portable":
        monkeypatch.setattr(native, "_lib", portable_library)
    return request.param


@pytest.fixture(params=[1, 3], ids=["one-thread", "three-threads"])
def threads(request, monkeypatch, build):
    """The one-pass kernels on one thread and split across threads, on either build."""
    monkeypatch.setattr(native, "elementwise_threads", lambda: request.param)
    return request.param


@pytest.mark.parametrize("n", SIZES)
def test_compress_decompress_match_reference(n, threads):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    threshold = float(x.abs().median())
    packed, values = native.compress(x, threshold)
    keep = x.abs() >= threshold
    assert torch.equal(packed, _packed(keep))
    assert torch.equal(values, x[keep])
    assert torch.equal(native.decompress(packed, values, n), torch.where(keep, x, torch.zeros(())))
    # signed comparison and an all-kept threshold
    packed, values = native.compress(x, 0.0, absolute=False)
    assert torch.equal(values, x[x >= 0])
    assert native.compress(x, 0.0)[1].numel() == n


@pytest.mark.parametrize("n", SIZES)
def test_relu_bits_and_grad_match_torch(n, threads):
    g = torch.Generator().manual_seed(n)
    x, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    out, packed = native.relu_bits(x)
    assert torch.equal(out, torch.relu(x))
    assert torch.equal(packed, _packed(x > 0))
    assert torch.equal(native.relu_grad(grad, packed), torch.where(x > 0, grad, torch.zeros(())))
    inplace = x.clone()
    out, packed_inplace = native.relu_bits(inplace, out=inplace)
    assert out.data_ptr() == inplace.data_ptr()
    assert torch.equal(inplace, torch.relu(x))
    assert torch.equal(packed_inplace, packed)


def test_relu_passes_nan_like_torch(build):
    x = torch.tensor([float("nan"), -1.0, 2.0, 0.0] * 4)
    out, packed = native.relu_bits(x)
    assert torch.equal(out.isnan(), torch.relu(x).isnan())
    assert torch.equal(packed, _packed(x > 0))


@pytest.mark.parametrize("n", [5, 64, 65541])
def test_select_keeps_entries_at_or_above_threshold(n, threads):
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    t = float(x.abs().quantile(0.7))
    assert torch.equal(native.select(x, t), torch.where(x.abs() >= t, x, torch.zeros(())))


def test_decompress_refuses_mismatched_values():
    packed, values = native.compress(torch.arange(16.0), 8.0)
    with pytest.raises(ValueError, match="8 set bits but 7 values"):
        native.decompress(packed, values[:7], 16)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        native.decompress(packed, values, 16, out=torch.empty(15))


def _swat_step(use_native: bool, monkeypatch):
    monkeypatch.setattr(native, "_lib", native._lib if use_native else None)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BitReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        BitReLU(),
        nn.Flatten(),
        nn.Linear(8 * 15 * 15, 10),
    ).to(memory_format=torch.channels_last)
    swat.convert(model, {"0.weight": 0.5, "2.weight": 0.3, "5.weight": 0.2}, period=1)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_swat_layers_give_the_same_results_with_and_without_kernels(monkeypatch):
    out_native, grads_native = _swat_step(True, monkeypatch)
    out_ref, grads_ref = _swat_step(False, monkeypatch)
    assert torch.equal(out_native, out_ref)
    for a, b in zip(grads_native, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    with pytest.warns(RuntimeWarning, match="no-such-compiler-xyz"):
        assert not native.available()
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.parametrize("n", SIZES)
def test_kth_largest_magnitude_is_exact_with_ties(n, threads):
    g = torch.Generator().manual_seed(n)
    cases = [
        torch.randn(n, generator=g),
        torch.randint(-3, 4, (n,), generator=g).float(),  # heavy ties, zeros of both signs
        -torch.zeros(n),
    ]
    for x in cases:
        for k in sorted({1, max(1, n // 10), max(1, n // 2), n}):
            thr, count = native.kth_largest_abs(x, k)
            ref = float(torch.kthvalue(x.abs(), n - k + 1).values)
            assert thr == ref
            assert count == int((x.abs() >= ref).sum()) >= k


def test_kth_largest_refuses_k_out_of_range():
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\], got 5"):
        native.kth_largest_abs(torch.ones(4), 5)


def test_swat_thresholds_agree_with_and_without_kernels(monkeypatch):
    x = torch.randn(3, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    with_kernels = swat.threshold_and_share(x, 0.1)
    monkeypatch.setattr(native, "_lib", None)
    without = swat.threshold_and_share(x, 0.1)
    assert float(with_kernels[0]) == float(without[0]) and with_kernels[1] == without[1]


def test_every_entry_point_is_declared_once_in_kernels_h_and_each_call_is_checked_against_it():
    """The sources' exported functions are exactly those ``kernels.h`` declares (the Python side reads no other
    list), and a call that does not match the declaration is refused before any C code runs."""
    import re

    folder = native._KERNELS_H.parent
    defined = set()
    for source in native._SOURCES:
        text = re.sub(r"/\*.*?\*/", "", source.read_text(), flags=re.S)
        defined |= set(re.findall(r"^(?:void|int|int64_t) (\w+)\([^)]*\)\s*\{", text, flags=re.M))
    header = re.sub(r"/\*.*?\*/", "", (folder / "kernels.h").read_text(), flags=re.S)
    declared = re.findall(r"^(?:void|int|int64_t) (\w+)\(", header, flags=re.M)
    assert len(declared) == len(set(declared)) and set(declared) == defined
    lib = native._load()
    assert all(callable(getattr(lib, name)) for name in declared)
    x, out = torch.randn(8), torch.empty(8)
    lib.select_f32(x, 8, 0.5, out, 1)
    assert torch.equal(out, torch.where(x.abs() >= 0.5, x, torch.zeros(())))
    with pytest.raises(TypeError, match="expects 5 arguments, got 4"):
        lib.select_f32(x, 8, 0.5, out)
    with pytest.raises(TypeError):
        lib.select_f32(x, 8, "0.5", out, 1)  # a string where a float is declared


def test_a_library_without_a_declared_function_is_refused(tmp_path):
    """A library that lacks an entry point of ``kernels.h`` is not loaded (``_load`` then rebuilds it)."""
    src = tmp_path / "partial.c"
    src.write_text("#include <stdint.h>\nint64_t chunk_count(int64_t n) { return n; }\n")
    lib = tmp_path / "partial.so"
    import subprocess

    subprocess.run([*native.compiler(), "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    lib.chmod(0o700)
    with pytest.raises(OSError, match="lacks the function"):
        native._open(lib)
