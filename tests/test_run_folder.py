"""Output folders and the kernel cache are the project's alone: no write through a link, one run per folder, a full
disk ends the run in one line with the last checkpoint whole, outputs follow the umask, the kernel cache is
private; and the Python API refuses misuse at construction, before anything changes."""

import errno
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from conftest import tiny_datasets

import sparsetrain as st
from sparsetrain.app import Trainer
from sparsetrain.app.checkpoint import save_checkpoint
from sparsetrain.app.cli import main
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.execution import native

TINY = [
    "model.name=small_cnn",
    "data.dataset=mnist",
    "optim.batch_size=32",
    "optim.epochs=1",
    "run.progress=false",
    "run.threads=1",
    "model.channels_last=false",
]


def _trainer(out, *extra):
    return Trainer(
        load_config(overrides=[*TINY, f"run.out_dir={out}", *extra]), datasets=tiny_datasets(n_train=64, n_test=32)
    )


def test_a_link_to_outside_in_the_run_folder_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    before = (outside.read_bytes(), outside.stat().st_mtime_ns)
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.json").symlink_to(outside)
    with pytest.raises(
        ConfigError, match=r"holds links that lead outside it \(final.json\); a run writes only its own"
    ):
        _trainer(run).fit()
    assert (outside.read_bytes(), outside.stat().st_mtime_ns) == before


def test_files_are_replaced_never_written_through(tmp_path):
    """A link inside the folder is replaced by the file, not followed; outputs take the umask's mode."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "target.txt").write_text("mine")
    (run / "config.yaml").symlink_to(run / "target.txt")
    old = os.umask(0o027)
    try:
        _trainer(run).fit()
    finally:
        os.umask(old)
    assert (run / "target.txt").read_text() == "mine" and not (run / "config.yaml").is_symlink()
    for name in ("config.yaml", "final.json", "checkpoint.pt", "model.pt", "model.sparse.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name


def test_the_final_model_has_a_sparse_sibling_with_the_same_weights(tmp_path):
    import sparsetrain as st

    run = tmp_path / "run"
    _trainer(run).fit()
    dense = torch.load(run / "model.pt", weights_only=True)["model"]
    sparse = st.load_sparse(run / "model.sparse.safetensors")
    assert set(sparse) == set(dense) and all(torch.equal(sparse[k], dense[k]) for k in dense)


HOLD = """
import sys, time
from conftest import tiny_datasets
from sparsetrain.app import Trainer
from sparsetrain.app.config import load_config
t = Trainer(load_config(overrides=sys.argv[1:]), datasets=tiny_datasets(n_train=64, n_test=32))
t.out.prepare()
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, *TINY, f"run.out_dir={run}"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=rf"is in use by another run \(process {holder.pid}\)"):
            _trainer(run).fit()
        assert time.monotonic() - t0 < 1.0
    finally:
        holder.kill()
        holder.wait()
    _trainer(run).fit()  # the killed holder left no lock behind
    assert (run / "final.json").exists()


def test_a_full_disk_ends_the_run_in_one_line_and_the_last_checkpoint_resumes_exactly(tmp_path, monkeypatch, capsys):
    args = ["train", *TINY, "optim.epochs=2", "data.dataset=mnist"]
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    import sparsetrain.app.checkpoint as ck

    real_save, calls = torch.save, [0]

    def save(obj, f, *a, **k):  # the second checkpoint write finds the disk full
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    from conftest import make_image_tar

    data = make_image_tar(tmp_path / "mnist.tar", 64, 32)
    monkeypatch.setattr(ck.torch, "save", save)
    assert main([*args, f"data.data_dir={data}", f"data.cache_dir={tmp_path / 'c'}", f"run.out_dir={cut}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: OSError: [Errno 28] no space left on the device while writing")
    assert "intact" in err[0] and not list(cut.glob("*.tmp")) and not list(cut.glob(".*.tmp"))
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert main([*args, f"data.data_dir={data}", f"data.cache_dir={tmp_path / 'c'}", f"run.out_dir={cut}"]) == 0
    assert main([*args, f"data.data_dir={data}", f"data.cache_dir={tmp_path / 'c'}", f"run.out_dir={full}"]) == 0
    a, b = torch.load(full / "model.pt")["model"], torch.load(cut / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_the_kernel_cache_is_private_and_a_foreign_one_is_not_loaded(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "native").mkdir(parents=True)
    os.chmod(shared / "native", 0o777)
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(shared))
    monkeypatch.setattr(native, "_fallback_dir", None)
    with pytest.warns(RuntimeWarning, match=r"the kernel cache is not private \(.* is writable by others"):
        path = native.library_path()
    assert shared not in path.parents
    mine = tmp_path / "mine"
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(mine))
    assert stat.S_IMODE((native.library_path().parent).stat().st_mode) == 0o700


def test_a_cached_library_without_its_functions_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    if not native.available():
        pytest.skip("no C compiler here")
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    path = native.library_path()
    src = tmp_path / "empty.c"
    src.write_text("int unrelated(void) { return 1; }\n")
    subprocess.run([*native.compiler(), "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    os.chmod(path, 0o700)
    path.with_suffix(".sha1").write_text(native._digest(path))  # a matching digest does not make it ours
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert native.available() and native._lib.chunk_count(1) == 1


# --------------------------------------------------------------------------- the Python API refuses misuse


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_an_optimizer_over_another_model_is_refused():
    model, other = _net(), _net()
    with pytest.raises(
        ValueError, match=r"the optimizer holds none of the model's parameters \(it was built over another"
    ):
        st.rigl(model, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.5, total_steps=10)


def test_an_optimizer_holding_only_the_dense_layers_is_refused():
    model = _net()
    opt = torch.optim.SGD([model[0].weight, model[4].weight], lr=0.1)
    with pytest.raises(ValueError, match=r"the optimizer holds none of the model's sparse weights \(\['2.weight'\]"):
        st.static(model, opt, sparsity=0.5)


def test_a_second_sparsifier_on_the_same_model_is_refused_until_the_first_is_removed():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = st.static(model, opt, sparsity=0.5)
    with pytest.raises(ValueError, match=r"the model already carries a sparsifier \(Static\)"):
        st.rigl(model, opt, sparsity=0.5, total_steps=10)
    first.remove()
    st.rigl(model, opt, sparsity=0.5, total_steps=10)


def test_tied_weights_are_masked_once():
    tied = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    tied[2].weight = tied[0].weight  # the same tensor in two layers
    sp = st.static(tied, torch.optim.SGD(tied.parameters(), lr=0.1), sparsity=0.5, dense_layers=["last"])
    assert list(sp.maskset.masks) == ["0.weight"]
    assert sp.sparsity() == pytest.approx(0.5, abs=1e-2)
    assert 1 - float(tied[0].weight.count_nonzero()) / tied[0].weight.numel() == pytest.approx(0.5, abs=1e-2)


def test_dense_layers_that_leave_nothing_sparse_are_refused():
    model = _net()
    with pytest.raises(
        ValueError,
        match=r"dense_layers=\['\*'\] leaves no layer sparse \(the model's Conv/Linear weights: "
        r"\['0.weight', '2.weight', '4.weight'\]\)",
    ):
        st.static(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, dense_layers=["*"])


def test_a_string_sparsity_is_refused_by_name():
    model = _net()
    with pytest.raises(TypeError, match=r"sparsity must be a number in \[0, 1\), got '0.9'"):
        st.static(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity="0.9")


def test_a_frozen_layer_under_a_method_that_reads_gradients_is_refused():
    model = _net()
    model[2].weight.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"rigl reads the gradients of its sparse weights, but \['2.weight'\] are frozen"
    ):
        st.rigl(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=10)


def test_a_state_of_another_sparsity_or_width_is_refused_before_anything_changes():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.static(model, opt, sparsity=0.5)
    other_model = _net()
    other = st.static(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), sparsity=0.8)
    masks = {n: m.clone() for n, m in sp.maskset.masks.items()}
    with pytest.raises(ValueError, match=r"this state is from sparsity 0.8; this sparsifier is at sparsity 0.5"):
        sp.load_state_dict(other.state_dict())
    wide = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    wide_sp = st.static(wide, torch.optim.SGD(wide.parameters(), lr=0.1), sparsity=0.5)
    with pytest.raises(
        ValueError,
        match=r"checkpoint masks have other shapes than the model's weights \(1 layer\(s\); "
        r"2.weight: \(16, 32\) saved, \(16, 16\) here\)",
    ):
        sp.load_state_dict(wide_sp.state_dict())
    assert all(torch.equal(m, sp.maskset.masks[n]) for n, m in masks.items()) and sp.clock.step == 0


def test_a_non_finite_evaluation_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    import sparsetrain.app.trainer as trainer_module
    from sparsetrain.app import TrainingError

    trainer = _trainer(tmp_path / "run", "optim.epochs=2")
    monkeypatch.setattr(trainer_module, "evaluate", lambda *a, **k: {"loss": float("nan"), "acc": 10.0})
    with pytest.raises(
        TrainingError,
        match=r"the test loss is nan after step 2 \(epoch 1\): the weights diverged; the "
        r"checkpoint of .* holds the last good state",
    ):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "final.json").exists()


def test_non_finite_final_weights_are_not_written(tmp_path, monkeypatch):
    from sparsetrain.app import TrainingError

    trainer = _trainer(tmp_path / "run")
    real = trainer.method.export_state

    def poisoned():
        state = real()
        state["0.weight"] = state["0.weight"] * float("inf")
        return state

    monkeypatch.setattr(trainer.method, "export_state", poisoned)
    with pytest.raises(
        TrainingError, match=r"the final weights hold non-finite values \(\['0.weight'\]\) after step 2"
    ):
        trainer.fit()
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_text_whose_validation_tail_cannot_fill_a_window_names_the_option(tmp_path):
    from sparsetrain.data.images import DatasetError
    from sparsetrain.data.text import load_text

    (tmp_path / "t.txt").write_text("abcdefghij" * 20)
    with pytest.raises(
        DatasetError,
        match=r"the validation tail of .* \(data.val_fraction=0.05: 10 characters\) cannot fill "
        r"one window of data.context=16 \+ 1; raise data.val_fraction",
    ):
        load_text(tmp_path / "t.txt", 16, 0.05)


def test_ctrl_c_says_what_a_rerun_resumes_from(tmp_path, monkeypatch, capsys):
    from conftest import make_image_tar

    data = make_image_tar(tmp_path / "mnist.tar", 64, 32)
    args = ["train", *TINY, "optim.epochs=2", f"data.data_dir={data}", f"data.cache_dir={tmp_path / 'c'}"]

    real = Trainer.end_epoch

    def interrupt_at(epoch):
        def end_epoch(self, stats):
            if self.progress.epoch + 1 == epoch:
                raise KeyboardInterrupt
            return real(self, stats)

        monkeypatch.setattr(Trainer, "end_epoch", end_epoch)

    interrupt_at(1)
    assert main([*args, f"run.out_dir={tmp_path / 'a'}"]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted before the first checkpoint: nothing in {tmp_path / 'a'} to resume; the same command starts over"
    )
    interrupt_at(2)
    assert main([*args, f"run.out_dir={tmp_path / 'b'}"]) == 130
    assert (
        capsys.readouterr().err.strip()
        == f"interrupted: the same command resumes from {tmp_path / 'b' / 'checkpoint.pt'}"
    )


def test_a_state_refused_for_its_masks_leaves_the_clock_as_it_was():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.rigl(model, opt, sparsity=0.5, total_steps=10, dense_layers=["first"])
    other = _net()
    other_sp = st.rigl(other, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    state = other_sp.state_dict()
    state["clock"] = {**state["clock"], "step": 7}
    with pytest.raises(ValueError, match="checkpoint masks do not match the model's sparse parameters"):
        sp.load_state_dict(state)
    assert sp.clock.step == 0


def test_a_checkpoint_holding_code_is_refused_as_such(tmp_path):
    import pickle

    from sparsetrain.app import CheckpointError, load_checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    with open(tmp_path / "ck.pt", "wb") as f:
        torch.save({"format": 2, "x": Payload()}, f, pickle_module=pickle)
    with pytest.raises(
        CheckpointError,
        match=r"holds objects other than tensors and plain data \(code could run if it "
        r"were unpickled\), so it was not loaded",
    ) as e:
        load_checkpoint(tmp_path / "ck.pt")
    assert "weights_only=False" not in str(e.value)


def test_sample_refuses_a_vocabulary_of_another_run(tmp_path, capsys):
    from sparsetrain.models import build_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        load_config(
            overrides=["model.name=gpt", "data.dataset=text", "model.width=0.25", "model.depth=1", "model.heads=2"]
        ).to_yaml()
    )
    model = build_model("gpt", 5, width=0.25, depth=1, heads=2)
    save_checkpoint({"format": 2, "model": model.state_dict()}, run / "model.pt")
    (run / "vocab.json").write_text('{"chars": ["a", "b", "c"]}')
    assert main(["sample", str(run), "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds 3 characters but the model was trained on 5: the vocabulary is not this run's" in err


def test_a_disk_that_fills_inside_torch_saves_zip_writer_ends_in_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    """The zip writer of ``torch.save`` turns a failed write into ``RuntimeError: ... unexpected pos``; the run still
    ends in one line naming the file, exit 2, no partial file: the first checkpoint fills a tiny disk."""
    import io

    import sparsetrain.app.checkpoint as ck

    real_fdopen, room = os.fdopen, [6000]

    class TinyDisk(io.RawIOBase):  # a file on a disk with ``room`` bytes left
        def __init__(self, f):
            self.f = f

        def writable(self):
            return True

        def write(self, data):
            if len(data) > room[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            room[0] -= len(data)
            return self.f.write(data)

        def flush(self):
            if not self.f.closed:
                self.f.flush()

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(ck.os, "fdopen", lambda fd, mode: TinyDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="no space left on the device while writing"):
        ck.save_checkpoint({"w": torch.zeros(10_000)}, tmp_path / "ck.pt")
    assert not list(tmp_path.iterdir())  # no partial file, no temporary left
    from conftest import make_image_tar

    data = make_image_tar(tmp_path / "mnist.tar", 64, 32)
    out = tmp_path / "run"
    args = ["train", *TINY, "optim.epochs=1", "data.dataset=mnist", f"data.data_dir={data}", f"run.out_dir={out}"]
    assert main([*args, f"data.cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: OSError: [Errno 28] no space left on the device while writing")
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")) and not (out / "checkpoint.pt").exists()
