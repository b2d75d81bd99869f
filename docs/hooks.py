"""MkDocs hooks: the configuration and CLI references are generated from the code (never written twice), the
benchmark tables are read from ``benchmarks/results/*.md``, and the plots there are served with the site."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def on_files(files, config):
    """Serve every plot of benchmarks/results/ under results/ in the site."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


def _config_reference() -> str:
    from pydantic import BaseModel

    from sparsetrain.app.config import Config

    out = []

    def section(model: type[BaseModel], prefix: str) -> None:
        rows, subs = [], []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((ann, f"{prefix}{name}."))
                continue
            default = field.get_default(call_default_factory=True)
            kind = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| `{prefix}{name}` | `{kind}` | `{default!r}` | {desc} |".replace("`''`", "`\"\"`"))
        if rows:
            doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out.append(f"### `{prefix.rstrip('.') or 'config'}`\n\n{doc}\n\n| key | type | default | meaning |\n|---|---|---|---|")
            out.extend(rows)
            out.append("")
        for sub, p in subs:
            section(sub, p)

    section(Config, "")
    return "\n".join(out)


def _cli_reference() -> str:
    from sparsetrain.app.cli import build_parser

    parser = build_parser()
    out = ["```text", parser.format_help().rstrip(), "```"]
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            out += [f"### `sparsetrain {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _backends_table() -> str:
    from sparsetrain.execution.backends import BACKENDS

    rows = ["| backend | what it does | layers | mask schemes | stores only kept weights | devices | layouts | SWAT's layers |",
            "|---|---|---|---|---|---|---|---|"]
    for name, b in BACKENDS.items():
        compact = "yes" if b.compact else ("static masks" if b.compact_fixed_masks else "no")
        layers = ", ".join(t.__name__ for t in b.layer_types) if b.swaps_layers else "as they are"
        rows.append(f"| `{name}` | {b.summary} | {layers} | {', '.join(b.schemes) if b.schemes else 'any'} | {compact} | "
                    f"{', '.join(b.devices)} | {', '.join(b.layouts)} | {'yes' if b.own_layers else 'no'} |")
    return "\n".join(rows)


def _figures_table() -> str:
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    return figures.table()


def _include(name: str, level: int) -> str:
    """The results file ``name`` for a place under a heading of ``level``: its own title dropped (the page's
    heading names it) and its other headings moved below ``level``, so the page's contents list stays whole."""
    path = ROOT / name
    if not path.exists():
        return f"*({name} has not been written yet)*"
    lines = path.read_text().splitlines()
    if lines and re.match(r"# ", lines[0]):
        lines = lines[1:]
    fenced = False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        heading = None if fenced else re.match(r"(#+) ", line)
        if heading:
            lines[i] = "#" * (len(heading.group(1)) - 1 + level) + line[len(heading.group(1)) :]
    return "\n".join(lines).strip() + "\n"


def _with_includes(markdown: str) -> str:
    """Every ``{{ include "path" }}`` of a page filled (see :func:`_include`)."""
    out, level, fenced = [], 1, False
    for line in markdown.split("\n"):
        fenced ^= line.startswith("```")
        heading = None if fenced else re.match(r"(#+) ", line)
        if heading:
            level = len(heading.group(1))
        out.append(re.sub(r"\{\{ include \"([^\"]+)\" \}\}", lambda m: _include(m.group(1), level), line))
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    """Fill the generated parts of a page."""
    if "{{ config_reference }}" in markdown:
        markdown = markdown.replace("{{ config_reference }}", _config_reference())
    if "{{ backends_table }}" in markdown:
        markdown = markdown.replace("{{ backends_table }}", _backends_table())
    if "{{ figures_table }}" in markdown:
        markdown = markdown.replace("{{ figures_table }}", _figures_table())
    if "{{ cli_reference }}" in markdown:
        markdown = markdown.replace("{{ cli_reference }}", _cli_reference())
    return _with_includes(markdown)
