"""No PyTorch transform kills the process: ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and
``torch.func.grad`` over a model whose sparsifier runs each backend (and SWAT), each transform in a subprocess of its
own, so that a crash fails the test instead of ending the suite. Each pair either works or raises one
``NoDataError`` naming the layer and what runs instead."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from sparsetrain.execution import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernels are not built")

CHILD = textwrap.dedent(
    """
    import json, sys, torch, torch.nn as nn
    import sparsetrain as st
    from sparsetrain.execution.native import NoDataError

    torch.set_num_threads(1)
    transform = sys.argv[1]
    out = {}
    for execution in ("direct", "condensed", "channel", "auto", "swat"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(4, 3, 8, 8)
        if execution == "swat":
            sp = st.swat(model, opt, sparsity=0.9, execution="auto", total_steps=10)
        elif execution == "channel":
            sp = st.static(model, opt, sparsity=0.5, scheme="channel_out", execution="channel")
        else:
            sp = st.static(model, opt, sparsity=0.9, execution=execution, compact_state=execution != "auto",
                           example_inputs=x)
        for _ in range(2):  # eager steps first, as a user would
            loss = model(x).sum(); opt.zero_grad(); loss.backward(); opt.step()
        try:
            if transform == "compile":
                compiled = torch.compile(model, backend="aot_eager")  # the fake-tensor tracing of the default
                for _ in range(2):
                    loss = compiled(x).sum(); opt.zero_grad(); loss.backward(); opt.step()
            elif transform == "export":
                torch.export.export(model, (x,))
            elif transform == "jit":
                torch.jit.trace(model, (x,), check_trace=False)
            elif transform == "func":
                params = dict(model.named_parameters())
                torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
            out[execution] = "ok"
        except NoDataError as e:
            out[execution] = "refused: " + str(e)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("transform", ["compile", "export", "jit", "func"])
def test_a_transform_over_every_backend_works_or_refuses_in_one_line(transform):
    done = subprocess.run([sys.executable, "-c", CHILD, transform], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the process ended with {done.returncode}: {done.stderr[-2000:]}"
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(outcome) == {"direct", "condensed", "channel", "auto", "swat"}
    for execution, what in outcome.items():
        if what != "ok":
            assert "\n" not in what and ("backend" in what or "SWAT" in what), (execution, what)
            assert "execution='masked'" in what or "sp.remove()" in what, (execution, what)
    if transform in ("compile", "jit"):
        assert set(outcome.values()) == {"ok"}, outcome  # the kernels run at graph breaks / are traced as calls
