"""The documentation site's pages as the site renders them (``docs/hooks.py`` filled in): one title per page,
headings that never skip a level (so each page's contents list shows every section), no heading glued into a
paragraph by an include, and no repository link that goes nowhere."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _headings(markdown: str) -> list[tuple[int, str]]:
    found, fenced = [], False
    for line in markdown.split("\n"):
        fenced ^= line.startswith("```")
        m = None if fenced else re.match(r"(#+) (.*)", line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_a_rendered_page_has_one_title_and_headings_that_never_skip_a_level(page, hooks):
    rendered = hooks.on_page_markdown(page.read_text(), None, None, None)
    levels = [level for level, _ in _headings(rendered)]
    assert levels and levels[0] == 1 and levels.count(1) == 1, levels
    assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), _headings(rendered)
    fenced = False
    for line in rendered.split("\n"):
        fenced ^= line.startswith("```")
        assert fenced or not re.search(r"\S\s+#{1,6} \w", line.split("|")[0]), line  # a heading inside a line


def test_the_site_links_no_repository_that_does_not_exist():
    config = (ROOT / "mkdocs.yml").read_text()
    assert "example.invalid" not in config and "repo_url" not in config


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_a_page_longer_than_a_screen_has_sections_for_its_contents_list(page, hooks):
    """The contents list beside each page is made of its second-level headings: a long page without them lists
    only its own title. Method pages (short, with a reference block) hold at least one."""
    rendered = hooks.on_page_markdown(page.read_text(), None, None, None)
    sections = [title for level, title in _headings(rendered) if level == 2]
    if len(rendered.splitlines()) > 40:
        assert len(sections) >= 2, (page.name, sections)
    if ":::" in rendered:
        assert sections, page.name


def test_wide_tables_scroll_inside_their_box():
    """Names in code cells never break mid-word (``semi_stru/ctured``): the site's stylesheet keeps them whole and
    lets the table scroll instead."""
    config = (ROOT / "mkdocs.yml").read_text()
    css = (ROOT / "docs" / "stylesheets" / "extra.css").read_text()
    assert "stylesheets/extra.css" in config
    assert re.search(r"table:not\(\[class\]\) code \{[^}]*white-space: nowrap", css)
