"""The architecture stays easy to see: no import cycles between the package's modules (function-level imports
included), one registry per concept, and every example runs."""

import ast
import importlib.util
from pathlib import Path

import pytest

import sparsetrain as st

SRC = Path(st.__file__).parent
REPO = SRC.parent.parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at any level of the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sparsetrain"):
                continue
            for alias in node.names:  # `from . import native` names a module
                sub = f"{target}.{alias.name}"
                out.add(
                    sub
                    if (SRC.parent / (sub.replace(".", "/") + ".py")).exists()
                    or (SRC.parent / sub.replace(".", "/")).is_dir()
                    else target
                )
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sparsetrain")}
    out.discard(name)
    return out


def test_no_import_cycles():
    graph = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}
    # a package's __init__ re-exporting its own children is the package, not a dependency of theirs
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if d in graph and not (mod.startswith(d + ".") and d != "sparsetrain")}
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in graph[m]:
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


# each layer of the package and the layers it may import (besides itself); the application may import anything
LAYERS = {
    "core": set(),
    "data": {"core"},
    "models": set(),
    "execution": {"core"},
    "methods": {"core", "execution"},
    "recipes": {"core", "execution", "methods"},
    "integrations": {"core", "execution", "methods"},
}


def test_the_layers_import_only_downward():
    wrong = []
    for path in SRC.rglob("*.py"):
        mod = _module_name(path)
        layer = mod.split(".")[1] if "." in mod else None
        if layer not in LAYERS:
            continue
        for dep in _imports(path):
            target = dep.split(".")[1] if "." in dep else None
            if target is not None and target != layer and target not in LAYERS[layer]:
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, wrong


def test_one_registry_per_concept_read_by_config_and_api():
    from sparsetrain.app import config
    from sparsetrain.core.scores import SCORERS
    from sparsetrain.data.images import DATASETS
    from sparsetrain.execution.backends import BACKENDS
    from sparsetrain.models import MODELS

    assert config.METHODS is st.METHODS and set(st.METHODS) == {
        "dense",
        "static",
        "lottery",
        "set",
        "rigl",
        "mest",
        "swat",
    }
    assert all(callable(f) and f.__doc__ for f in st.METHODS.values())
    assert {"cifar10", "mnist"} <= set(DATASETS) and {"resnet20", "vgg16"} <= set(MODELS)
    assert {"random", "magnitude", "snip", "grasp"} <= set(SCORERS) and "direct" in BACKENDS


def test_the_custom_loop_example_runs(tmp_path, monkeypatch):
    work = tmp_path / "work"  # beside the test's own kernel cache (tmp_path/cache)
    work.mkdir()
    monkeypatch.chdir(work)
    spec = importlib.util.spec_from_file_location("custom_loop", REPO / "examples" / "custom_loop.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["2"])
    assert out["sparsity"] == pytest.approx(0.9, abs=1e-3) and out["updates"] > 0 and out["loss"] < 1.0
    assert not any(type(m).__module__.startswith("sparsetrain") for m in out["model"].modules())
    assert out["plan"].requested == "condensed" and list(out["plan"].layers) == ["2.weight"]
    assert out["plan"].layers["2.weight"].backend == "condensed" and out["plan"].layers["2.weight"].compact
    assert not any(work.iterdir()) and out["checkpoint"].exists()  # nothing written where it ran


def test_every_public_name_has_a_docstring():
    import inspect
    import pkgutil

    missing = []
    for info in pkgutil.walk_packages(st.__path__, "sparsetrain."):
        mod = importlib.import_module(info.name)
        if not mod.__doc__:
            missing.append(info.name)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != mod.__name__:
                continue
            if not obj.__doc__:
                missing.append(f"{info.name}.{name}")
            for attr, value in vars(obj).items() if inspect.isclass(obj) else ():
                fn = value.fget if isinstance(value, property) else value
                if attr.startswith("_") or not callable(fn) or fn.__doc__:
                    continue
                if not any(getattr(getattr(base, attr, None), "__doc__", None) for base in obj.__mro__[1:]):
                    missing.append(f"{info.name}.{name}.{attr}")
    assert not missing, missing


MAX_FUNCTION_LINES = 60


def test_no_function_runs_long_without_saying_why():
    """Functions read on one screen: one over MAX_FUNCTION_LINES lines says why in a ``# long:`` comment among its
    first lines (a declarative table such as an argument parser, or one recipe that reads top to bottom)."""
    import ast

    long = []
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                head = lines[node.lineno - 1 : node.body[0].end_lineno + 1]  # the signature, docstring, next line
                if size > MAX_FUNCTION_LINES and not any(line.strip().startswith("# long:") for line in head):
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({size} lines)")
    assert not long, long
