"""Bad input never trains silently and never runs code: a table of refused inputs (type and message),
the CLI's one-line errors, the crafted-pickle case, changed image folders."""

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_tar, tiny_datasets

from sparsetrain.app import CheckpointError, Trainer, TrainingError, load_checkpoint, save_checkpoint
from sparsetrain.app.cli import format_error, main
from sparsetrain.app.config import ConfigError, load_config
from sparsetrain.data import images as D
from sparsetrain.data.images import DatasetError, load_dataset, read_idx
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


# --------------------------------------------------------------------------- inputs the cases use
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    f = {"good_tar": make_image_tar(root / "good.tar", 64, 32)}
    raw = f["good_tar"].read_bytes()
    # cut at a member boundary: the archive reads, but as fewer images and no end-of-archive marker
    with tarfile.open(f["good_tar"]) as tar:
        cut = [m for m in tar.getmembers()][40].offset
    (root / "cut.tar").write_bytes(raw[:cut])
    f["cut_tar"] = root / "cut.tar"
    (root / "junk.tar").write_bytes(b"this is not a tar archive" * 100)
    f["junk_tar"] = root / "junk.tar"
    f["one_class"] = make_image_tar(root / "one.tar", 20, 10, classes=1)
    f["eleven"] = make_image_tar(root / "eleven.tar", 44, 22, classes=11)
    f["rgb32"] = make_image_tar(root / "rgb.tar", 20, 10, size=32, channels=3)
    with tarfile.open(root / "badimg.tar", "w") as tar:
        for split, n in (("train", 4), ("test", 2)):
            for i in range(n):
                payload = b"not a png at all" if (split, i) == ("train", 3) else _png(i)
                info = tarfile.TarInfo(f"x/{split}/c{i % 2}/{i}.png")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    f["bad_image"] = root / "badimg.tar"
    return f


def _png(i):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 10 * i, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _idx(arr: np.ndarray) -> bytes:
    import struct

    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx_set(d: Path, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n, dtype=np.uint8)))
    return d


def _trainer(tmp, extra=(), datasets=None):
    return Trainer(load_config(overrides=[*TINY, f"run.out_dir={tmp}", *extra]), datasets=datasets or tiny_datasets())


def _finished_run(tmp, extra=()):
    t = _trainer(tmp / "run", ["optim.epochs=1", *extra])
    t.fit()
    return tmp / "run"


def _resume(tmp, first, second, datasets=None):
    _trainer(tmp / "r", first).fit()
    _trainer(tmp / "r", second, datasets).fit()


# --------------------------------------------------------------------------- the table
def _cfg(*overrides):
    return lambda tmp, files: load_config(overrides=list(overrides))


def _data(source, name="mnist", **kw):
    return lambda tmp, files: load_dataset(
        name, files[source] if isinstance(source, str) and source in files else source, cache_dir=tmp / "cache", **kw
    )


def _config_file(text):
    def run(tmp, files):
        (tmp / "c.yaml").write_text(text)
        return load_config(tmp / "c.yaml")

    return run


def _checkpoint_bytes(content):
    def run(tmp, files):
        (tmp / "ck.pt").write_bytes(content) if isinstance(content, bytes) else torch.save(content, tmp / "ck.pt")
        return load_checkpoint(tmp / "ck.pt")

    return run


def _truncated_checkpoint(tmp, files):
    save_checkpoint({"format": 2, "model": {"w": torch.ones(1000)}}, tmp / "ck.pt")
    (tmp / "ck.pt").write_bytes((tmp / "ck.pt").read_bytes()[:500])
    return load_checkpoint(tmp / "ck.pt")


def _idx_case(kind):
    def run(tmp, files):
        d = _write_idx_set(tmp)
        if kind == "truncated":
            p = d / "train-images-idx3-ubyte"
            p.write_bytes(p.read_bytes()[:-100])
            return read_idx(p)
        if kind == "magic":
            (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
        return load_dataset("mnist", d, cache_dir=tmp / "cache")  # "sizes": 30/10 are not MNIST's 60000/10000

    return run


def _idx_labels_out_of_range(tmp, files):
    d = _write_idx_set(tmp)
    (d / "train-labels-idx1-ubyte").write_bytes(_idx(np.full(30, 12, np.uint8)))
    import sparsetrain.data.images as data

    old = dict(data.SPLIT_SIZES)
    data.SPLIT_SIZES["mnist"] = (30, 10)
    try:
        return load_dataset("mnist", d, cache_dir=tmp / "cache")
    finally:
        data.SPLIT_SIZES.clear()
        data.SPLIT_SIZES.update(old)


def _official_name_wrong_checksum(tmp, files):
    archive = tmp / "cifar-10-python.tar.gz"
    _crafted_cifar(archive, tmp / "pwned")
    return load_dataset("cifar10", archive, cache_dir=tmp / "cache")


def _crafted_cifar(archive: Path, marker: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in (
            ("cifar-10-batches-py/batches.meta", Payload()),
            ("cifar-10-batches-py/data_batch_1", Payload()),
        ):
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _crafted_under_other_name(tmp, files):
    archive = tmp / "my-cifar-python.tar.gz"  # no known checksum to compare: the unpickler itself must refuse
    _crafted_cifar(archive, tmp / "pwned")
    return D.read_cifar_archive(archive, "cifar10")


def _download_off(tmp, files):
    return load_dataset("cifar10", tmp, download=False, cache_dir=tmp / "cache")


def _empty_layer(tmp, files):
    import sparsetrain as st
    from sparsetrain.models import build_model

    model = build_model("mlp")
    return st.static(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.99999)


def _other_method_state(tmp, files):
    import sparsetrain as st
    from sparsetrain.models import build_model

    model = build_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = st.rigl(model, opt, sparsity=0.9, total_steps=10).state_dict()
    model2 = build_model("mlp")
    return st.static(model2, torch.optim.SGD(model2.parameters(), lr=0.1), sparsity=0.9).load_state_dict(state)


def _native_build(cc):
    def run(tmp, files):
        os.environ["CC"] = cc
        try:
            return native._build(tmp / "k.so")
        finally:
            os.environ.pop("CC")

    return run


# (id, callable(tmp, files), exception type, a regex the message must match: it names the key, file or value)
CASES = [
    # config
    ("unknown-key", _cfg("optim.lrr=0.1"), ConfigError, r"optim\.lrr.*unknown key"),
    (
        "sparsity-range",
        _cfg("sparsity.method=static", "sparsity.sparsity=1.5"),
        ConfigError,
        r"sparsity\.sparsity.*1\.5",
    ),
    ("epochs-zero", _cfg("optim.epochs=0"), ConfigError, r"optim\.epochs.*0"),
    ("batch-negative", _cfg("optim.batch_size=-1"), ConfigError, r"optim\.batch_size.*-1"),
    ("unknown-model", _cfg("model.name=resnet7"), ConfigError, r"model\.name.*resnet7"),
    ("unknown-dataset", _cfg("data.dataset=imagenet7"), ConfigError, r"data\.dataset.*imagenet7"),
    ("unknown-method", _cfg("sparsity.method=magic"), ConfigError, r"sparsity\.method.*magic"),
    (
        "unknown-scheme",
        _cfg("sparsity.method=static", "sparsity.sparsity=0.5", "sparsity.scheme=hexagon"),
        ConfigError,
        r"sparsity\.scheme.*hexagon",
    ),
    (
        "bad-phases",
        _cfg("sparsity.method=mest", "sparsity.sparsity=0.5", "sparsity.mest.mutation_ratio=[[0.5,0.1]]"),
        ConfigError,
        r"mutation_ratio.*start at 0",
    ),
    (
        "swat-distribution",
        _cfg("sparsity.method=swat", "sparsity.sparsity=0.9", "sparsity.distribution=erk"),
        ConfigError,
        r"sparsity\.distribution",
    ),
    ("dense-sparsity", _cfg("sparsity.sparsity=0.5"), ConfigError, r"sparsity\.sparsity"),
    (
        "compact-masked",
        _cfg("sparsity.method=static", "sparsity.sparsity=0.5", "sparsity.compact_state=true"),
        ConfigError,
        r"compact_state.*'masked'",
    ),
    (
        "channel-backend",
        _cfg("sparsity.method=static", "sparsity.sparsity=0.5", "sparsity.backend=channel"),
        ConfigError,
        r"scheme=channel_out",
    ),
    ("override-shape", _cfg("optim.lr"), ConfigError, r"'optim\.lr'.*section\.key=value"),
    ("override-yaml", _cfg("optim.milestones=[0.5,"), ConfigError, r"optim\.milestones.*not valid YAML"),
    ("config-missing", lambda tmp, files: load_config(tmp / "nope.yaml"), ConfigError, r"nope\.yaml does not exist"),
    ("config-yaml", _config_file("optim: [unclosed"), ConfigError, r"c\.yaml is not valid YAML"),
    ("config-list", _config_file("- 1\n- 2\n"), ConfigError, r"c\.yaml must hold a mapping"),
    ("adamw-momentum", _cfg("optim.name=adamw", "optim.momentum=0.5"), ConfigError, r"optim\.momentum"),
    ("soft-blend-order", _cfg("recipe.soft_hold=0.5", "recipe.soft_blend_end=0.2"), ConfigError, r"soft_blend_end"),
    ("val-fraction", _cfg("data.val_fraction=1.0"), ConfigError, r"data\.val_fraction.*1\.0"),
    # data
    ("dataset-name", lambda tmp, files: load_dataset("imagenet7"), DatasetError, r"imagenet7"),
    (
        "data-path-missing",
        lambda tmp, files: load_dataset("mnist", tmp / "nothing.tar"),
        DatasetError,
        r"nothing\.tar does not exist",
    ),
    ("tar-cut-at-member", _data("cut_tar"), DatasetError, r"cut\.tar: truncated tar"),
    ("tar-junk", _data("junk_tar"), DatasetError, r"junk\.tar: not a readable tar"),
    ("image-corrupt", _data("bad_image"), DatasetError, r"train/c1/3\.png: not a readable image"),
    ("one-class", _data("one_class"), DatasetError, r"one\.tar.*1 class"),
    ("labels-range-folder", _data("eleven"), DatasetError, r"eleven\.tar.*labels span 0\.\.10.*0\.\.9"),
    ("labels-range-idx", _idx_labels_out_of_range, DatasetError, r"labels span 12\.\.12"),
    ("image-shape", _data("rgb32"), DatasetError, r"rgb\.tar: images are \(1, 32, 32\), mnist expects \(1, 28, 28\)"),
    ("idx-truncated", _idx_case("truncated"), DatasetError, r"train-images-idx3-ubyte: truncated IDX"),
    ("idx-magic", _idx_case("magic"), DatasetError, r"t10k-labels-idx1-ubyte: not a uint8 IDX"),
    ("idx-partial", _idx_case("sizes"), DatasetError, r"30 training and 10 test.*60000 and 10000"),
    ("archive-checksum", _official_name_wrong_checksum, DatasetError, r"cifar-10-python\.tar\.gz: checksum mismatch"),
    ("archive-pickle", _crafted_under_other_name, DatasetError, r"batches\.meta: not a data pickle.*refusing.*system"),
    ("download-off", _download_off, DatasetError, r"cifar-10-python\.tar\.gz not found and downloading is off"),
    (
        "download-off-damaged",
        lambda tmp, files: (tmp / "cifar-10-python.tar.gz").write_bytes(b"x" * 10) and _download_off(tmp, files),
        DatasetError,
        r"cifar-10-python\.tar\.gz: checksum mismatch .* downloading is off",
    ),
    # checkpoints
    (
        "checkpoint-garbage",
        _checkpoint_bytes(b"\x00garbage" * 50),
        CheckpointError,
        r"ck\.pt is corrupted or truncated",
    ),
    ("checkpoint-truncated", _truncated_checkpoint, CheckpointError, r"ck\.pt is corrupted or truncated"),
    (
        "checkpoint-foreign",
        _checkpoint_bytes({"weights": torch.ones(2)}),
        CheckpointError,
        r"ck\.pt is not a sparsetrain",
    ),
    (
        "checkpoint-missing",
        lambda tmp, files: load_checkpoint(tmp / "none.pt"),
        CheckpointError,
        r"none\.pt does not exist",
    ),
    (
        "resume-other-lr",
        lambda tmp, files: _resume(tmp, [], ["optim.lr=0.5"]),
        CheckpointError,
        r"optim\.lr: 0\.1 -> 0\.5.*resume_with_changes",
    ),
    (
        "resume-other-model",
        lambda tmp, files: _resume(tmp, [], ["model.name=mlp", "run.resume_with_changes=true"]),
        CheckpointError,
        r"model\.name: 'small_cnn' -> 'mlp'.*cannot change",
    ),
    (
        "resume-other-data",
        lambda tmp, files: _resume(tmp, [], [], tiny_datasets(seed=1)),
        CheckpointError,
        r"training data differ",
    ),
    (
        "resume-other-method",
        lambda tmp, files: _resume(tmp, [], ["sparsity.method=static", "sparsity.sparsity=0.5"]),
        CheckpointError,
        r"sparsity\.method: 'dense' -> 'static'",
    ),
    ("state-other-method", _other_method_state, ValueError, r"from method 'rigl'; this sparsifier is 'static'"),
    # run directories and training
    (
        "out-dir-file",
        lambda tmp, files: (tmp / "f").write_text("x") and _trainer(tmp / "f").fit(),
        ConfigError,
        r"run\.out_dir=.*/f is a file",
    ),
    (
        "out-dir-unwritable",
        lambda tmp, files: _trainer(Path("/proc/sparsetrain-run")).fit(),
        ConfigError,
        r"run\.out_dir=/proc/sparsetrain-run cannot be written",
    ),
    (
        "no-training-batch",
        lambda tmp, files: _trainer(tmp, ["data.val_fraction=0.999"], tiny_datasets(n_train=200)),
        ConfigError,
        r"no training batch.*data\.val_fraction=0\.999",
    ),
    (
        "model-input",
        lambda tmp, files: _trainer(tmp, ["model.name=resnet20"]),
        ConfigError,
        r"model 'resnet20' does not take mnist's input of shape \(1, 28, 28\)",
    ),
    (
        "nonfinite-loss",
        lambda tmp, files: _trainer(tmp, ["optim.lr=1e30", "optim.warmup_epochs=0", "optim.schedule=constant"]).fit(),
        TrainingError,
        r"training loss is (nan|inf) at step \d+ \(epoch 1, learning rate 1e\+30\)",
    ),
    ("layer-left-empty", _empty_layer, ValueError, r"sparsity 0\.99999 leaves .* with no weight"),
    # native builds
    (
        "cc-missing",
        _native_build("no-such-cc -O2"),
        RuntimeError,
        r"no C compiler \('no-such-cc', from CC='no-such-cc -O2'\)",
    ),
    ("cc-fails", _native_build("cc -no-such-flag-xyz"), RuntimeError, r"cc -no-such-flag-xyz failed"),
]


def test_the_table_holds_enough_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_its_type_and_a_message_naming_it(case, files, tmp_path):
    _, call, kind, pattern = case
    with pytest.raises(kind) as err:
        call(tmp_path, files)
    assert type(err.value) is kind or kind in (ValueError, RuntimeError), type(err.value)
    assert __import__("re").search(pattern, str(err.value), flags=__import__("re").S), str(err.value)
    assert not (tmp_path / "pwned").exists()  # no payload ran
    if kind is not RuntimeError:  # native build failures never reach the CLI: the numpy path takes over, with a warning
        line = format_error(err.value)  # what the CLI would print: one line, no traceback
        assert line is not None and line.startswith("error: ") and "\n" not in line


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["train", "optim.lrr=1"], r"optim\.lrr"),
        (["train", "optim.milestones=[0.5,"], r"not valid YAML"),
        (["train", "--data-dir", "/no/such/cifar.tar"], r"/no/such/cifar\.tar does not exist"),
        (["eval", "/no/such/run"], r"/no/such/run is not a run directory"),
        (
            ["train", "model.name=small_cnn", "data.dataset=mnist", "run.out_dir=/proc/x-run", "run.progress=false"],
            None,
        ),
    ],
)
def test_the_cli_prints_one_line_and_exits_2(argv, pattern, capsys, files):
    if pattern is None:  # the run directory is checked after the data load: give it data
        argv = [*argv, "--data-dir", str(files["good_tar"])]
        pattern = r"run\.out_dir=/proc/x-run cannot be written"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and "Traceback" not in err
        and __import__("re").search(pattern, err, flags=__import__("re").S)
    )


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["--debug", "train", "optim.lrr=1"])


def test_a_crafted_archive_runs_no_code_through_eval_of_a_shared_run(tmp_path, capsys):
    """The path the report found: a shared run directory whose config points at a crafted archive."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    _crafted_cifar(archive, tmp_path / "pwned")
    run = tmp_path / "shared-run"
    run.mkdir()
    (run / "config.yaml").write_text(
        load_config(overrides=[f"data.data_dir={archive}", "data.download=false"]).to_yaml()
    )
    from sparsetrain.models import build_model

    save_checkpoint({"format": 2, "model": build_model("resnet20").state_dict()}, run / "model.pt")
    assert main(["eval", str(run)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_a_changed_image_folder_is_decoded_again(tmp_path):
    root = tmp_path / "tree"
    with tarfile.open(make_image_tar(tmp_path / "t.tar", 20, 10)) as tar:
        tar.extractall(root, filter="data")
    first = load_dataset("mnist", root / "tiny", cache_dir=tmp_path / "cache")
    victim = sorted((root / "tiny" / "train").rglob("*.png"))[0]
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(victim)
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = load_dataset("mnist", root / "tiny", cache_dir=tmp_path / "cache")
    assert not torch.equal(first["train"].images, second["train"].images)
