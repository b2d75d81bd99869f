import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from sparsetrain.core.accounting import FlopMeter, measure_layer_costs, saved_tensor_bytes
from sparsetrain.models import build_model


def test_resnet18_cifar_and_resnet50_imagenet_macs():
    r18 = measure_layer_costs(build_model("resnet18"), (3, 32, 32))
    assert r18.total_forward / 2 == pytest.approx(0.56e9, rel=0.02)
    r50 = measure_layer_costs(build_model("resnet50"), (3, 224, 224))
    assert r50.total_forward / 2 == pytest.approx(4.1e9, rel=0.02)


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mlp"])
def test_backward_split_equals_torchs_counter_on_the_whole_backward(name):
    from sparsetrain.models import model_input_shape

    model = build_model(name)
    costs = measure_layer_costs(model, model_input_shape(name))
    x = torch.randn(2, *model_input_shape(name))
    out = model(x)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert costs.total_backward * 2 == counter.get_total_flops()
    assert costs.layers[0].input_grad == 0  # the input image needs no gradient
    assert sum(lc.forward for lc in costs.layers) == costs.total_forward


def test_training_flops_scale_with_densities():
    costs = measure_layer_costs(build_model("resnet20"), (3, 32, 32))
    dense = costs.training_flops()
    assert dense["total"] == costs.total_forward + costs.total_backward
    wd = {lc.name: 0.1 for lc in costs.layers}
    ad = {lc.name: 0.5 for lc in costs.layers}
    sparse = costs.training_flops(wd, ad)
    assert sparse["forward"] == pytest.approx(0.1 * dense["forward"])
    assert sparse["input_grad"] == pytest.approx(0.1 * dense["input_grad"])
    assert sparse["weight_grad"] == pytest.approx(0.5 * dense["weight_grad"])
    assert costs.forward_flops(wd) == pytest.approx(0.1 * costs.total_forward)


def test_flop_meter_accumulates_over_changing_densities():
    costs = measure_layer_costs(build_model("mlp"), (1, 28, 28))
    meter = FlopMeter(costs)
    meter.step(10)  # dense
    meter.set_densities({lc.name: 0.5 for lc in costs.layers})
    meter.step(10)
    assert meter.relative() == pytest.approx(0.75)
    again = FlopMeter(costs)
    again.load_state_dict(meter.state_dict())
    assert again.relative() == pytest.approx(0.75)


def test_measuring_leaves_the_model_untouched():
    model = build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_layer_costs(model, (3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_saved_tensor_bytes_counts_what_autograd_keeps():
    lin = nn.Linear(100, 50, bias=False)
    x = torch.randn(32, 100, requires_grad=False)
    # a linear layer saves its input (32x100 floats) for the weight gradient
    assert saved_tensor_bytes(lambda: lin(x).sum().backward()) == 32 * 100 * 4
    y = torch.randn(32, 100, requires_grad=True)
    both = saved_tensor_bytes(lambda: lin(y).sum().backward())
    assert both == 32 * 100 * 4 + 50 * 100 * 4  # input and weight


def test_peak_memory_is_the_process_own_not_its_parents():
    """A child's peak must not start from the parent's (ru_maxrss does after fork + exec)."""
    import subprocess
    import sys

    from sparsetrain.core.accounting import peak_memory_bytes

    big = torch.ones(100_000_000)  # 400 MB, touched
    parent = peak_memory_bytes()
    child = int(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from sparsetrain.core.accounting import peak_memory_bytes; print(peak_memory_bytes())",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    del big
    assert parent >= 400e6
    assert child < parent - 300e6
