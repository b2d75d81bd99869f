import pytest
import torch

from sparsetrain.models import MODELS, SEQUENCE_MODELS, build_model, model_input_shape


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"resnet50"} - SEQUENCE_MODELS))
def test_every_zoo_model_runs_forward_and_backward(name):
    model = build_model(name, num_classes=7)
    out = model(torch.randn(2, *model_input_shape(name)))
    assert out.shape == (2, 7)
    out.sum().backward()


@pytest.mark.parametrize(
    "name, params",
    [
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet56", 0.85e6),
        ("resnet18", 11.2e6),
        ("vgg16", 14.7e6),
        ("wrn16_8", 11.0e6),
        ("resnet50", 25.6e6),
    ],
)
def test_parameter_counts_match_the_literature(name, params):
    n = sum(p.numel() for p in build_model(name).parameters())
    assert n == pytest.approx(params, rel=0.03)


def test_width_multiplier_doubles_resnet32_channels():
    wide = build_model("resnet32", width=2.0)
    assert wide.conv1.out_channels == 32 and wide.fc.in_features == 128


def test_unknown_model_and_bad_width():
    with pytest.raises(ValueError, match="unknown model 'resnet7'.*resnet20"):
        build_model("resnet7")
    with pytest.raises(ValueError, match="width must be > 0"):
        build_model("resnet20", width=0)


def test_the_gpt_matches_the_protocol_d_size():
    model = build_model("gpt", 65, context=64, depth=4, heads=4)  # 4 blocks, width 128, context 64, 65 characters
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    assert model.tok.weight.shape == (65, 128) and model.pos.weight.shape == (64, 128)
    assert blocks == 4 * (12 * 128 * 128 + 13 * 128)  # qkv, proj, fc, out and their biases, two LayerNorms
    assert build_model("gpt", 65, width=4.0, context=128).tok.weight.shape[1] == 512  # D-speed: width 512


def test_the_vit_attends_over_every_patch_and_its_linears_are_the_sparse_layers():
    import sparsetrain as st

    torch.manual_seed(0)
    model = build_model("vit", 10, depth=2, heads=4)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    # not causal: the class token's output depends on the last patch too
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[:, :, -4:, -4:].abs().sum() > 0
    opt = torch.optim.AdamW(model.parameters())
    sp = st.static(model, opt, sparsity=0.9, total_steps=1)  # dense_layers default: the patch embedding and the head
    assert sorted(sp.maskset.masks) == sorted(
        f"blocks.{b}.{m}.weight" for b in range(2) for m in ("qkv", "proj", "fc", "out")
    )
    with pytest.raises(ValueError, match="does not give the 64 patches"):
        model(torch.randn(1, 3, 28, 28))


def test_depth_and_heads_are_for_transformers_only():
    from sparsetrain.app.config import ConfigError, load_config

    assert load_config(overrides=["model.name=vit", "model.depth=2", "model.heads=2"]).model.depth == 2
    with pytest.raises(ConfigError, match=r"model.depth and model.heads shape the transformers \(\['gpt', 'vit'\]\)"):
        load_config(overrides=["model.depth=2"])
