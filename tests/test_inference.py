"""The inference form (``st.for_inference``) and ``sparsetrain export``: outputs equal to the masked dense model in
eval mode, from a sparsifier, a plain model or a sparse checkpoint; BatchNorm folded; no autograd state; refusals
in one line; ``torch.export`` programs that round-trip through a file; the command on a real run folder."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.execution import native

kernels = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernels are not built")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )


def _trained(steps: int = 3):
    """A CNN trained a few steps under static 90% (BatchNorm statistics moved off their start), and its sparsifier."""
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = st.static(model, opt, sparsity=0.9, dense_layers=())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, sp


@kernels
@pytest.mark.parametrize("execution", ["masked", "csr", "direct", "condensed", "auto"])
def test_the_inference_form_equals_the_masked_model_in_eval_mode(execution):
    model, sp = _trained()
    plain = _cnn()
    plain.load_state_dict(sp.export_state())
    x = torch.randn(2, 3, 8, 8)
    expected = plain.eval()(x)
    served = st.for_inference(sp, _cnn(), execution=execution, example_inputs=x)
    got = served(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not got.requires_grad and not any(isinstance(m, nn.BatchNorm2d) for m in served.modules())
    assert set(served.plan) == {"0.weight", "3.weight", "6.weight", "9.weight", "11.weight"}
    if execution not in ("auto", "masked"):
        assert set(served.plan.values()) - {"masked"}, served.plan  # the kernels run where the backend takes the layer
    assert torch.equal(sp.maskset.masks["3.weight"], model[3].weight != 0)  # the source is left as it was


def test_the_inference_form_from_a_removed_model_and_from_a_sparse_checkpoint(tmp_path):
    _, sp = _trained()
    st.save_sparse(sp, tmp_path / "m.safetensors")
    plain = sp.remove()
    x = torch.randn(1, 3, 8, 8)
    expected = plain.eval()(x)
    for served in (
        st.for_inference(plain, execution="masked"),
        st.for_inference(tmp_path / "m.safetensors", _cnn(), execution="masked"),
    ):
        torch.testing.assert_close(served(x), expected, rtol=1e-4, atol=1e-5)


def test_refusals_name_what_is_missing():
    _, sp = _trained(1)
    with pytest.raises(TypeError) as e:
        st.for_inference(_cnn(), execution="auto")
    assert str(e.value) == (
        "execution='auto' chooses each layer's path by timing it: give example_inputs= (a batch of the shape that "
        "will be served), or name a backend"
    )
    with pytest.raises(TypeError, match=r"^for_inference of a sparsifier needs a fresh model"):
        st.for_inference(sp, execution="masked")
    swapped = _cnn()
    st.static(swapped, torch.optim.SGD(swapped.parameters(), lr=0.1), sparsity=0.9, execution="csr")
    with pytest.raises(TypeError, match=r"^this model still carries a sparsifier's layers"):
        st.for_inference(swapped, execution="masked")
    with pytest.raises(TypeError, match=r"^for_inference takes a sparsifier, an nn.Module"):
        st.for_inference(42, execution="masked")
    with pytest.raises(ValueError, match="unknown backend"):
        st.for_inference(_cnn(), execution="fast")
    served = st.for_inference(_cnn(), execution="masked")
    with pytest.raises(RuntimeError, match="^an inference form does not train"):
        served.train()


@kernels
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_a_torch_export_program_of_the_inference_form_round_trips_through_a_file(kind, tmp_path):
    from sparsetrain.app.export import exported_program

    if kind == "cnn":
        _, sp = _trained()
        plain, x, execution = _cnn(), torch.randn(2, 3, 8, 8), "direct"
        plain.load_state_dict(sp.export_state())
    else:  # token features through Linear layers: the condensed operator
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
        with torch.no_grad():
            for m in (plain[0], plain[2]):
                m.weight.mul_(torch.rand(m.weight.shape) < 0.1)
        x, execution = torch.randn(2, 16, 32), "condensed"
    served = st.for_inference(plain, execution=execution, example_inputs=x)
    program = exported_program(served, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("sparsetrain" in o for o in ops), ops  # the kernels are in the graph as operators
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    torch.testing.assert_close(loaded(x), plain.eval()(x), rtol=1e-4, atol=1e-5)


@kernels
def test_the_export_command_writes_both_formats_of_a_finished_run(tmp_path, capsys):
    from conftest import make_image_tar

    from sparsetrain.app.cli import main
    from sparsetrain.app.export import trained_model

    data = make_image_tar(tmp_path / "mnist.tar", 64, 16)
    run = tmp_path / "run"
    assert main(
        ["train", "model.name=small_cnn", "data.dataset=mnist", "optim.epochs=1", "run.progress=false"]
        + ["sparsity.method=static", "sparsity.sparsity=0.9", f"data.data_dir={data}", f"run.out_dir={run}"]
        + [f"data.cache_dir={tmp_path / 'c'}"]
    ) in (0, None)
    capsys.readouterr()
    _, model = trained_model(run)
    x = torch.randn(1, 1, 28, 28)
    expected = model(x)
    assert main(["export", str(run), "--format", "sparse", "--out", str(tmp_path / "m.safetensors")]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["format"] == "sparse" and said["bytes"] == (tmp_path / "m.safetensors").stat().st_size
    reloaded = st.load_sparse(tmp_path / "m.safetensors", trained_model(run)[1])
    torch.testing.assert_close(reloaded(x), expected)
    assert main(["export", str(run), "--format", "pt2"]) == 0
    program = torch.export.load(run / "model.pt2").module()
    torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-5)
    assert main(["export", str(run), "--format", "onnx"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(
            "error: ValueError: --format onnx: ONNX has no operator that keeps unstructured sparsity, and 2 layer(s) are "
            "unstructured sparse ("
        )
    )
    assert main(["export", str(run), "--format", "tflite"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: ValueError: --format 'tflite': choose one of ['onnx', 'pt2', 'sparse']"
    )


@kernels
def test_onnx_export_of_a_channel_run_takes_the_pruned_channels_out_and_runs_in_onnxruntime(tmp_path, capsys):
    """Channel pruning on both sides: the ONNX file's layers are physically smaller (the pruned channels taken out
    after BatchNorm is folded), onnx.checker accepts it, and onnxruntime computes the trained model's outputs."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from conftest import make_image_tar

    from sparsetrain.app.cli import main
    from sparsetrain.app.export import trained_model

    data = make_image_tar(tmp_path / "cifar.tar", 64, 16, size=32, channels=3)
    run = tmp_path / "run"
    keys = ["sparsity.method=static", "sparsity.sparsity=0.5", "sparsity.scheme=channel_out", "optim.batch_size=32"]
    keys += ["sparsity.backend=channel", "sparsity.channel_both_sides=true", "model.width=0.125"]
    assert main(
        ["train", "model.name=vgg16", "data.dataset=cifar10", "optim.epochs=1", "run.progress=false", *keys]
        + [f"data.data_dir={data}", f"run.out_dir={run}", f"data.cache_dir={tmp_path / 'c'}"]
    ) in (0, None)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    _, model = trained_model(run)
    x = torch.randn(1, 3, 32, 32)
    proto = onnx.load(str(run / "model.onnx"))
    onnx.checker.check_model(proto)
    stored = sum(int(torch.tensor(t.dims).prod()) for t in proto.graph.initializer)
    assert stored < 0.8 * sum(p.numel() for p in model.parameters())  # the pruned channels are not in the file
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-4)


def test_bench_inference_refuses_a_model_it_has_no_protocol_for(capsys):
    from sparsetrain.app.cli import main

    assert main(["bench", "--inference", "--model", "resnet18", "--sparsity", "0.9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: ValueError: inference benchmark model 'resnet18': choose one of ['gpt', 'resnet50', 'vgg16']"
    )


@pytest.mark.parametrize(
    "shape, k, s, p", [((1, 6, 17, 16), 3, 2, 1), ((2, 3, 9, 9), 2, 1, 0), ((1, 5, 7, 8), 3, 3, 1)]
)
def test_the_inference_forms_other_max_pools_equal_pytorchs_nans_included(shape, k, s, p):
    from sparsetrain.app.inference import _SlicedMaxPool2d

    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, 0, 1, 1] = float("nan")
    pool = nn.MaxPool2d(k, s, p)
    with torch.inference_mode():
        want, got = pool(x), _SlicedMaxPool2d(pool)(x)
    assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
