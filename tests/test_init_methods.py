"""Masks at initialisation: every scorer, layer-wise and global, hits its target exactly."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.core.distributions import layer_densities
from sparsetrain.core.masks import select_parameters
from sparsetrain.core.schemes import parse_scheme
from sparsetrain.core.scores import (
    SCORERS,
    ScoresByLayer,
    grasp_scores,
    masks_from_scores,
    random_scores,
    snip_scores,
    synflow_masks,
)
from sparsetrain.models import build_model, model_input_shape


def _setup(name):
    torch.manual_seed(0)
    model = build_model(name)
    params = select_parameters(model)
    shape = model_input_shape(name)
    batches = [(torch.randn(16, *shape), torch.randint(0, 10, (16,)))]
    return model, params, shape, batches


@pytest.mark.parametrize("model_name", ["resnet20", "small_cnn"])
@pytest.mark.parametrize("init", ["random", "magnitude", "snip", "grasp", "synflow"])
@pytest.mark.parametrize("global_ranking", [False, True])
def test_every_init_reaches_the_target_exactly(model_name, init, global_ranking):
    model, params, shape, batches = _setup(model_name)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    dens = layer_densities("erk" if global_ranking else "uniform", shapes, 0.9)
    scheme = parse_scheme("unstructured")
    if init == "synflow":
        masks = synflow_masks(model, list(params), dens, shape, scheme, global_ranking, rounds=10)
    else:
        scores = SCORERS[init](model, params, batches, torch.Generator().manual_seed(0))
        masks = masks_from_scores(scores, dens, scheme, global_ranking)
    if global_ranking:
        assert sum(int(m.sum()) for m in masks.values()) == round(sum(dens[n] * params[n].numel() for n in params))
    else:
        for n, m in masks.items():
            assert int(m.sum()) == round(dens[n] * m.numel())


@pytest.mark.parametrize("global_ranking", [False, True])
def test_cheap_scores_are_made_a_layer_at_a_time_and_give_the_masks_of_all_at_once(global_ranking):
    model, params, shape, batches = _setup("resnet20")
    dens = layer_densities("erk", {n: tuple(p.shape) for n, p in params.items()}, 0.9)
    scheme = parse_scheme("unstructured")
    drawn = dict(random_scores(model, params, batches, torch.Generator().manual_seed(0)).items())  # all at once
    at_once = masks_from_scores(drawn, dens, scheme, global_ranking)
    lazily = masks_from_scores(
        random_scores(model, params, batches, torch.Generator().manual_seed(0)), dens, scheme, global_ranking
    )
    assert all(torch.equal(lazily[n], at_once[n]) for n in at_once)
    made = []  # weak references to each layer's scores: the one before must be gone when the next is made

    def score(p):
        alive = sum(r() is not None for r in made)
        assert global_ranking or alive == 0, f"{alive} earlier layers' scores still held"
        t = p.detach().abs()
        made.append(weakref.ref(t))
        return t

    masks_from_scores(ScoresByLayer(params, score), dens, scheme, global_ranking)
    assert len(made) == len(params)


def test_snip_score_is_weight_times_gradient():
    model, params, shape, batches = _setup("small_cnn")
    scores = snip_scores(model, params, batches, None)
    x, y = batches[0]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        torch.testing.assert_close(scores[n], (g * p).abs())


def test_grasp_matches_a_finite_difference_hessian_gradient_product():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    scores = grasp_scores(model, params, batches, None, temperature=1.0)
    x, y = batches[0]

    def grad_at(shift):
        with torch.no_grad():
            for p, s in zip(params.values(), shift):
                p.add_(s)
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
        with torch.no_grad():
            for p, s in zip(params.values(), shift):
                p.sub_(s)
        return g

    g0 = grad_at([torch.zeros_like(p) for p in params.values()])
    eps = 1e-6
    plus, minus = grad_at([eps * g for g in g0]), grad_at([-eps * g for g in g0])
    for (n, p), gp, gm in zip(params.items(), plus, minus):
        hg = (gp - gm) / (2 * eps)
        torch.testing.assert_close(scores[n], (p * hg).detach(), rtol=1e-4, atol=1e-8)


def test_synflow_uses_no_data_and_leaves_the_model_alone():
    model, params, shape, _ = _setup("resnet20")
    before = copy.deepcopy(model.state_dict())
    dens = {n: 0.1 for n in params}
    m1 = synflow_masks(model, list(params), dens, shape, parse_scheme("unstructured"), True, rounds=5)
    m2 = synflow_masks(model, list(params), dens, shape, parse_scheme("unstructured"), True, rounds=5)
    assert all(torch.equal(m1[n], m2[n]) for n in m1)  # deterministic: no data, no randomness
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_global_ranking_refuses_structured_schemes():
    _, params, _, _ = _setup("resnet20")
    scores = {n: p.abs() for n, p in params.items()}
    with pytest.raises(ValueError, match="global ranking needs the unstructured scheme"):
        masks_from_scores(scores, {n: 0.5 for n in params}, parse_scheme("channel_out"), True)
