"""Execution inside every sparsifier: ``execution=`` on the factories, the plan (a table, in the state dict,
restored without timing, reusable), exact resume, export back to plain layers, refusals asked of the backends,
and the architecture rules that keep backend names inside the registry."""

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import prefer_kernels, train_steps

import sparsetrain as st
from sparsetrain.execution import native
from sparsetrain.execution.backends import BACKENDS, auto
from sparsetrain.execution.plan import ExecutionPlan

needs_native = pytest.mark.skipif(not native.available(), reason="C kernels not built here")
SRC = Path(st.__file__).parent


class Net(nn.Module):
    """A small CNN: convs with BatchNorm and pooling, and two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _batches(n=6, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _build(factory, **kw):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, opt, factory(model, opt, **kw)


STATIC = dict(sparsity=0.9, dense_layers=["conv1.weight", "fc2.weight"])
RIGL = dict(sparsity=0.9, dense_layers=["conv1.weight", "fc2.weight"], total_steps=12, update_every_steps=2)


@pytest.mark.timing
@needs_native
def test_auto_plans_on_the_first_training_batch_and_trains_like_masked_dense():
    model, opt, sp = _build(st.static, **STATIC, execution="auto", compact_state=True)
    assert sp.plan is None  # waits for a batch
    with torch.no_grad():
        model.eval()
        model(torch.randn(2, 3, 16, 16))  # evaluation before training does not choose
        model.train()
    assert sp.plan is None
    ref_model, ref_opt, _ = _build(st.static, **STATIC)
    batches = _batches()
    losses = train_steps(model, opt, batches)
    assert sp.plan is not None and set(sp.plan.layers) == {"conv2.weight", "conv3.weight", "fc1.weight"}
    assert sp.plan.layout in ("nchw", "channels_last")
    assert all(lp.backend in BACKENDS for lp in sp.plan.layers.values())
    assert torch.allclose(torch.tensor(losses), torch.tensor(train_steps(ref_model, ref_opt, batches)), atol=1e-4)
    table = str(sp.plan)
    assert "execution plan: auto" in table and "conv2.weight" in table and "compact" in table
    assert abs(sp.sparsity() - 0.9) < 0.01


@needs_native
def test_a_layout_tie_is_timed_on_compact_layers_and_trains_like_masked_dense(monkeypatch):
    """Every timing injected: each layer's kernels faster than masked dense, the sparse plan far ahead of every
    layer masked, its two layouts tied on the quarter batch, NCHW faster on the whole batch. The planner compacts the
    plan's layers before the whole-batch passes (they time what training holds), keeps NCHW, and the model trains as
    masked dense does."""
    rounds, compact_then = [], []

    def injected(tries, timed, repeats):
        rounds.append([fmt for _, fmt in tries])
        compact_then.append(sorted(n for n, m in model.named_modules() if hasattr(m, "values")))
        whole = len(rounds) > 1
        return [
            10.0 if plan is None else (1.0 if (fmt == torch.channels_last) != whole else 1.02) for plan, fmt in tries
        ]

    prefer_kernels(monkeypatch)
    monkeypatch.setattr(auto, "_timed_alternately", injected)
    model, opt, sp = _build(st.static, **STATIC, execution="auto", compact_state=True)
    ref_model, ref_opt, _ = _build(st.static, **STATIC)
    batches = _batches()
    losses = train_steps(model, opt, batches)
    assert sp.plan.layout == "nchw"
    assert rounds[1] == [torch.channels_last, torch.contiguous_format]  # the two layouts alone, on the whole batch
    compact = sorted(n for n, lp in sp.plan.layers.items() if lp.compact)
    assert compact and compact_then == [[], [n.rsplit(".", 1)[0] for n in compact]]
    assert torch.allclose(torch.tensor(losses), torch.tensor(train_steps(ref_model, ref_opt, batches)), atol=1e-4)


@pytest.mark.timing
@needs_native
def test_auto_times_its_paths_holding_one_gradient_at_a_time():
    model, opt, sp = _build(st.static, **STATIC, execution="auto", lossless_activations=True)
    seen = []  # (planning, how many parameters hold a gradient) each time backward has made one
    for p in model.parameters():  # (hooks before the planner's: they see each gradient as it is made)
        p.register_post_accumulate_grad_hook(
            lambda p: seen.append((sp.plan is None, sum(q.grad is not None for q in model.parameters())))
        )
    train_steps(model, opt, _batches(n=1))
    planning = [n for pending, n in seen if pending]
    training = [n for pending, n in seen if not pending]
    assert planning and set(planning) == {1}  # every timing pass dropped each gradient once made
    assert max(training) == len(list(model.parameters()))  # the training step keeps them all, as always
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.timing
@needs_native
@pytest.mark.parametrize("factory, kw", [(st.static, STATIC), (st.rigl, RIGL)])
def test_resume_applies_the_saved_plan_without_timing_and_is_bit_identical(factory, kw, monkeypatch):
    batches = _batches(n=8)
    model, opt, sp = _build(factory, **kw, execution="auto", compact_state=True)
    train_steps(model, opt, batches[:4])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    assert saved["sp"]["plan"] == sp.plan.to_dict()
    full = train_steps(model, opt, batches[4:])

    def no_timing(*a, **k):
        raise AssertionError("a resumed run timed its choices again")

    monkeypatch.setattr(auto, "settle_layout", no_timing)
    monkeypatch.setattr("sparsetrain.execution.plan.settle_layout", no_timing)
    monkeypatch.setattr("sparsetrain.execution.backends.layers._SparseExec._choose", no_timing)
    model2, opt2, sp2 = _build(factory, **kw, execution="auto", compact_state=True)
    sp2.load_state_dict(saved["sp"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert sp2.plan == sp.plan
    resumed = train_steps(model2, opt2, batches[4:])
    assert full == resumed
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.timing
@needs_native
def test_a_plan_is_reusable_from_a_file_and_checked_against_the_model(tmp_path):
    model, opt, sp = _build(st.static, **STATIC, execution="auto", example_inputs=_batches(1)[0][0])
    assert sp.plan is not None  # chosen at build time on the example
    sp.plan.save(tmp_path / "plan.json")
    plan = ExecutionPlan.load(tmp_path / "plan.json")
    assert plan == sp.plan
    _, _, again = _build(st.static, **STATIC, execution=plan)
    assert again.plan == plan
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="the execution plan is for other layers than this model's"):
        st.static(other, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.5, execution=plan)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not an execution plan: not JSON"):
        ExecutionPlan.load(tmp_path / "bad.json")


def test_the_factories_refuse_through_the_backends_declarations():
    def fresh():
        model = Net()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="unknown backend 'fast'; choose one of"):
        st.static(*fresh(), sparsity=0.5, execution="fast")
    with pytest.raises(ValueError, match="backend 'channel' runs masks of whole output channels; set sparsity.scheme="):
        st.static(*fresh(), sparsity=0.5, execution="channel")
    with pytest.raises(ValueError, match="method 'swat' runs under backend 'masked', 'direct' or 'auto'"):
        st.swat(*fresh(), sparsity=0.5, execution="csr")
    model, opt = fresh()
    with pytest.raises(
        ValueError, match="compact_state stores only kept weights under backend 'direct', 'condensed' or"
    ):
        st.lottery(
            model, opt, sparsity=0.5, trained=dict(Net().named_parameters()), execution="direct", compact_state=True
        )
    with pytest.raises(ValueError, match="backend 'direct' runs masked layers sparse; method 'dense' has no masks"):
        st.dense(*fresh(), execution="direct")
    with pytest.raises(TypeError, match="execution must be a backend name, 'auto' or an ExecutionPlan"):
        st.static(*fresh(), sparsity=0.5, execution=3)


@needs_native
def test_remove_gives_plain_layers_with_the_exported_weights():
    model, opt, sp = _build(st.static, **STATIC, execution="direct", compact_state=True)
    train_steps(model, opt, _batches(n=2))
    exported = {k: v.clone() for k, v in sp.export_state().items()}
    plain = sp.remove()
    assert not any(type(m).__module__.startswith("sparsetrain") for m in plain.modules())
    assert {k: v for k, v in plain.state_dict().items()}.keys() == exported.keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, exported[k]), k
    assert "removed" in repr(sp)
    assert [ls.name for ls in sp.report()] == ["conv2.weight", "conv3.weight", "fc1.weight"]
    with pytest.raises(RuntimeError, match="the sparsifier was removed"):
        sp.state_dict()


@needs_native
def test_real_execution_runs_the_max_pools_on_the_compact_kernel_and_remove_gives_them_back():
    from sparsetrain.execution.activations import CompactMaxPool2d

    def pools(model):
        return [type(m) for m in model.modules() if isinstance(m, nn.MaxPool2d)]

    def build(execution):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1))
        model.append(nn.MaxPool2d(3))  # not a 2x2 window: left to PyTorch
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, st.static(model, opt, sparsity=0.8, dense_layers=(), execution=execution)

    grads = {}
    for execution in ("masked", "direct"):
        model, opt, sp = build(execution)
        kinds = [CompactMaxPool2d, nn.MaxPool2d] if execution == "direct" else [nn.MaxPool2d, nn.MaxPool2d]
        assert pools(model) == kinds
        x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = model(x)
        y.square().sum().backward()
        grads[execution] = [y.detach(), x.grad]  # the pools' outputs and gradients, through the sparse layers
        sp.remove()
        assert pools(model) == [nn.MaxPool2d, nn.MaxPool2d]
    for a, b in zip(grads["masked"], grads["direct"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swat_remove_equals_export_state_and_reports_after_removal():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = st.swat(model, opt, sparsity=0.8, topk_period=3)
    train_steps(model, opt, _batches(n=4))  # the weights move after the period's threshold was taken
    exported = {k: v.clone() for k, v in sp.export_state().items()}
    plain = sp.remove()
    state = plain.state_dict()
    assert state.keys() == exported.keys()
    for k in state:
        assert torch.equal(state[k], exported[k]), k
    assert "removed" in repr(sp)
    assert {ls.name for ls in sp.report()} == {
        n
        for n, _ in plain.named_parameters()
        if n.endswith("weight") and n != "conv1.weight" and not n.startswith("bn")
    }


def _compared_names(names: set[str], inside: tuple[str, ...]) -> list[str]:
    """``path:line`` of each comparison against one of ``names`` as a string, outside the folders ``inside``."""
    found = []
    for path in SRC.rglob("*.py"):
        if any(folder in path.as_posix() for folder in inside):
            continue
        tree = ast.parse(path.read_text())
        devices = {
            id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and "device" in f.name for n in ast.walk(f)
        }  # run.device=auto is a device, not a backend
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare) or id(node) in devices:
                continue
            for side in [node.left, *node.comparators]:
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_no_code_outside_the_backend_registry_compares_backend_names():
    found = _compared_names(set(BACKENDS), ("execution/backends",))
    assert not found, found


def test_no_code_outside_the_methods_compares_method_names():
    """What the configuration, the CLI and the Trainer ask of a method are its declared traits and knobs."""
    from sparsetrain.methods import METHODS

    found = _compared_names(set(METHODS), ("sparsetrain/methods/", "execution/backends"))
    assert not found, found


@pytest.mark.timing
def test_example_inputs_takes_a_batch_and_refuses_a_shape_naming_what_is_allowed():
    from sparsetrain.execution.options import ExecutionOptions

    x = torch.randn(2, 3)
    assert ExecutionOptions(example_inputs=x).example_inputs is x
    assert ExecutionOptions(example_inputs=(x, None)).example_inputs[0] is x  # positional inputs, not all tensors
    with pytest.raises(TypeError) as e:
        ExecutionOptions(example_inputs=(8, 3, 32, 32))
    assert str(e.value) == (
        "example_inputs is (8, 3, 32, 32) (a shape? give a batch of that shape, e.g. torch.randn(...)); allowed: a "
        "tensor, a tuple of the model's positional inputs (at least one a tensor), or None"
    )
    with pytest.raises(TypeError, match=r"^example_inputs is 'batch'; allowed: a tensor"):
        ExecutionOptions.of("auto", example_inputs="batch")
