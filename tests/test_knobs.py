"""One declaration per knob: every factory, configuration key and documented default agrees with the method's
declared knobs, every execution option with :class:`ExecutionOptions`, and no default is written a second time."""

from __future__ import annotations

import ast
import importlib.util
import inspect
from dataclasses import fields
from pathlib import Path

import pytest

import sparsetrain as st
from sparsetrain.app.config import FLAT_KNOBS, SECTION_KNOBS, SparsityConfig, load_config
from sparsetrain.execution.options import ExecutionOptions, option_fields
from sparsetrain.methods import METHOD_CLASSES, METHODS
from sparsetrain.methods.knobs import REQUIRED

SRC = Path(st.__file__).resolve().parent
REPO = SRC.parent.parent


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


@pytest.mark.parametrize("name", list(METHOD_CLASSES))
def test_the_factory_signature_and_doc_come_from_the_declared_knobs(name):
    cls, factory = METHOD_CLASSES[name], METHODS[name]
    params = inspect.signature(factory).parameters
    knobs = [k for k in cls.knobs if k.factory]
    assert list(params)[:2] == ["model", "optimizer"]
    assert set(params) == {"model", "optimizer", *(k.name for k in knobs), *(f.name for f in option_fields())}
    for k in knobs:
        p = params[k.name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, k.name
        if k.required:
            assert p.default is inspect.Parameter.empty, k.name
        else:
            assert p.default == k.default, k.name
            assert f"``{k.name}`` (default ``{k.default!r}``): {k.doc}" in factory.__doc__, k.name
    for f in option_fields():
        assert params[f.name].default == f.default
        assert f"``{f.name}`` (default ``{f.default!r}``)" in factory.__doc__
    assert factory.method is cls and getattr(st, name) is factory


def test_the_configuration_keys_are_the_declared_knobs_with_their_defaults_and_docs():
    section = SparsityConfig.model_fields
    for name, k in FLAT_KNOBS.items():
        default = k.default if k.config_default is REQUIRED else k.config_default
        assert _plain(section[name].get_default(call_default_factory=True)) == _plain(default), name
        assert section[name].description == k.doc, name
    for sec, knobs in SECTION_KNOBS.items():
        model = section[sec].annotation
        assert set(model.model_fields) == {k.name for k in knobs}, sec
        for k in knobs:
            got = model.model_fields[k.name].get_default(call_default_factory=True)
            assert _plain(got) == _plain(k.default) and model.model_fields[k.name].description == k.doc, k.name
    for f in option_fields():
        key = f.metadata["config_key"]
        if key is not None:
            assert (
                section[key or f.name].default == f.default and section[key or f.name].description == f.metadata["doc"]
            )


def test_a_knob_shared_by_several_methods_is_declared_alike_in_each():
    seen = {}
    for cls in METHOD_CLASSES.values():
        for k in cls.knobs:
            if k.config and k.section is None:
                first = seen.setdefault(k.name, k)
                assert (first.doc, first.config_default, first.config_kind, first.limits) == (
                    k.doc,
                    k.config_default,
                    k.config_kind,
                    k.limits,
                ), k.name


def test_the_configuration_builds_each_method_with_its_factory_defaults():
    for name, cls in METHOD_CLASSES.items():
        if not cls.traits.masks:
            continue
        cfg = load_config(overrides=[f"sparsity.method={name}", "sparsity.sparsity=0.5"])
        kw = cfg.sparsity.method_kwargs()
        for k in cls.knobs:
            if k.name in kw and k.name != "sparsity":
                default = k.default if k.config_default is REQUIRED else k.config_default
                assert _plain(kw[k.name]) == _plain(default), (name, k.name)
        assert cfg.sparsity.execution_options() == ExecutionOptions()


def test_the_documented_configuration_reference_shows_every_declared_default():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    reference = hooks._config_reference()
    for name, k in FLAT_KNOBS.items():
        default = k.default if k.config_default is REQUIRED else k.config_default
        assert f"| `sparsity.{name}` |" in reference and f"`{_plain(default)!r}`" in reference, name
    for sec, knobs in SECTION_KNOBS.items():
        for k in knobs:
            assert f"| `sparsity.{sec}.{k.name}` |" in reference, k.name


def _literal(default) -> bool:
    """A default written as a value (None is "not given": the callbacks' ``execution=None`` leaves the factory's
    choice; a call such as ``ExecutionOptions()`` reads the declarations)."""
    if isinstance(default, (ast.Tuple, ast.List)):
        return True
    return isinstance(default, ast.Constant) and default.value is not None


def _defaults_written_in_signatures() -> list[str]:
    """``path:line name`` for each function parameter of the methods, the configuration, the plan or the
    integrations named like a knob or an execution option that carries a literal default of its own (the
    declarations are the one place defaults live)."""
    names = {k.name for cls in METHOD_CLASSES.values() for k in cls.knobs} | {f.name for f in fields(ExecutionOptions)}
    names -= {"model", "optimizer", "total_steps", "steps_per_epoch", "epochs", "seed", "sparsity"}
    found = []
    paths = [*SRC.glob("methods/*.py"), SRC / "app" / "config.py", SRC / "execution" / "plan.py"]
    for path in [*paths, *SRC.glob("integrations/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            pairs = list(zip(args.kwonlyargs, args.kw_defaults)) + list(
                zip(args.args[len(args.args) - len(args.defaults) :], args.defaults)
            )
            found += [
                f"{path.relative_to(SRC)}:{node.lineno} {a.arg}" for a, d in pairs if _literal(d) and a.arg in names
            ]
    return found


def test_no_method_knob_or_execution_option_default_is_written_twice():
    found = _defaults_written_in_signatures()
    assert not found, found
