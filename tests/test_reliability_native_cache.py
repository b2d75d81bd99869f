"""The native kernels' private cache: a damaged library is rebuilt, never loaded; the compiler keys it;
a run whose kernels fell back says so."""

import os

import pytest
from conftest import tiny_datasets

from sparsetrain.app import Trainer
from sparsetrain.app.config import load_config
from sparsetrain.execution import native

TINY = [
    "model.name=small_cnn",
    "data.dataset=mnist",
    "optim.batch_size=32",
    "optim.epochs=2",
    "run.progress=false",
    "run.threads=1",
    "model.channels_last=false",
]


def _reload(monkeypatch) -> bool:
    """Load the kernels again, as a new process would (from the cache, or built into it)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    return native.available()


def _built_in(tmp_path, monkeypatch) -> None:
    """The kernels built into an empty cache at ``tmp_path`` and loaded from it."""
    if not native.available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    assert _reload(monkeypatch)


def test_a_corrupt_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    _built_in(tmp_path, monkeypatch)
    path = native.library_path()
    half = path.with_name("half.so")  # a half-written library (a new file: the loaded one stays mapped as it is)
    half.write_bytes(path.read_bytes()[:4096])
    os.replace(half, path)  # loading it would crash the process with a bus error
    assert _reload(monkeypatch) and native._intact(path) and path.stat().st_size > 4096


def test_the_declarations_beside_the_library_are_rebuilt_when_damaged_and_refused_when_not_private(
    tmp_path, monkeypatch
):
    """cffi's precompiled reading of kernels.h is Python code: kept beside the library, under its digest, and
    trusted as the library is."""
    _built_in(tmp_path, monkeypatch)
    declarations = native._declarations_path(native.library_path())
    assert native._intact(declarations)
    declarations.write_text("raise SystemExit('never run')\n")  # no longer the digest it was built with
    assert _reload(monkeypatch) and native._intact(declarations) and "never run" not in declarations.read_text()
    os.chmod(declarations, 0o666)
    with pytest.raises(OSError, match="is writable by others"):
        native._declarations(declarations)


def test_the_compiler_and_its_version_key_the_cache(monkeypatch):
    monkeypatch.setattr(native, "_compiler_version", lambda cc: "gcc 12.2")
    a = native.library_path()
    monkeypatch.setattr(native, "_compiler_version", lambda cc: "gcc 13.1")
    b = native.library_path()
    monkeypatch.setenv("CC", "cc -m64")
    assert native.compiler() == ["cc", "-m64"] and len({a, b, native.library_path()}) == 3


def test_a_direct_run_that_fell_back_records_csr(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)  # as without a C compiler
    cfg = load_config(
        overrides=[
            *TINY,
            "optim.epochs=1",
            f"run.out_dir={tmp_path}",
            "sparsity.method=static",
            "sparsity.sparsity=0.8",
            "sparsity.backend=direct",
            "sparsity.dense_layers=[]",
        ]
    )
    summary = Trainer(cfg, datasets=tiny_datasets()).fit()
    assert summary["backends"] and set(summary["backends"].values()) == {"csr"}
