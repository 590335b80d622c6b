"""README as a front page, and the documentation site's sources.

README: at most 200 lines, every link and image resolves to a file of the
repository (the docs pages are linked as their Markdown sources, which the site
builds), and its headline table is the one ``bench.report`` writes from the
published benchmark run.  The API reference lists every public name.  The site
itself is built by ``make docs`` (``mkdocs build --strict``) in CI.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCED = re.compile(r"^```.*?^```", re.S | re.M)


def _links(text: str) -> list[str]:
    return [m["target"] for m in LINK.finditer(FENCED.sub("", text))]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move long material into docs/"


def test_readme_links_resolve():
    targets = _links(README.read_text())
    assert len(targets) >= 10
    for target in targets:
        if re.match(r"https?://", target):
            assert target.startswith("http://127.0.0.1"), f"external link in README: {target}"
            continue
        path = target.split("#", 1)[0]
        assert (ROOT / path).is_file(), f"README links to {target}, which is not a file"


def test_readme_links_every_docs_page():
    """Each page of the site's nav is reachable from README (directly or via the guide)."""
    linked = {t.split("#", 1)[0] for t in _links(README.read_text())}
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert nav, "no pages found in mkdocs.yml's nav"
    for page in nav:
        if page in ("index.md", "changelog.md", "contributing.md") or page.startswith("api/"):
            continue
        assert f"docs/{page}" in linked, f"README does not link docs/{page}"


def test_nav_pages_exist_and_docs_pages_are_in_nav():
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert set(nav) == pages


def test_readme_headline_is_the_published_run():
    report = pytest.importorskip("bench.report")
    result = json.loads((ROOT / "bench/results/published.json").read_text())
    text = README.read_text()
    block = text.split(report.README_START, 1)[1].split(report.README_END, 1)[0]
    assert block.strip() == report.headline_markdown(result).strip(), (
        "README's headline table is not the published run's: run "
        "`python -m bench.report --publish bench/results/published.json`")
    for suffix in (".md", ".png"):
        assert (ROOT / f"bench/results/published{suffix}").is_file()
    published = (ROOT / "bench/results/published.md").read_text()
    assert report.headline_markdown(result) in published


def _public_names(module_file: Path) -> list[str]:
    """``__all__`` of a module, read without importing it (fastbn.torch needs torch)."""
    tree = ast.parse(module_file.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [n for n in ast.literal_eval(node.value) if not n.startswith("__")]
    raise AssertionError(f"{module_file} has no __all__")


@pytest.mark.parametrize(("module", "page"), [
    ("__init__", "fastbn"), ("functional", "functional"), ("residual", "residual"),
    ("torch", "torch"),
    ("distributed", "distributed"), ("reference", "reference")])
def test_api_reference_lists_every_public_name(module, page):
    names = _public_names(ROOT / "fastbn" / f"{module}.py")
    text = (ROOT / "docs" / "api" / f"{page}.md").read_text()
    if "members:" not in text and re.search(rf"^::: fastbn\.{page}$", text, re.M):
        return  # the whole module is rendered, every public member with it
    for name in names:
        documented = re.search(rf"(^::: fastbn(\.\w+)*\.{name}$)|(^\s+- {name}$)", text, re.M)
        assert documented, f"docs/api/{page}.md does not document {name}"


def test_chart_replots_from_saved_results(tmp_path):
    """`python -m bench.report --replot` draws the chart of any saved run (no re-run)."""
    pytest.importorskip("matplotlib")
    report = pytest.importorskip("bench.report")
    result = json.loads((ROOT / "bench/results/published.json").read_text())
    assert report.main(["--replot", str(ROOT / "bench/results/published.json"),
                        str(tmp_path / "chart.png")]) == 0
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = [c["case"]["id"] for c in report.headline_cases(result)]
    assert shown == [i for i in report.HEADLINE_CASES if i in shown] and len(shown) >= 3
    # a run without the headline shapes (e.g. --shapes) still gets a chart of its own cases
    result["cases"] = [c for c in result["cases"] if c["case"]["id"] not in report.HEADLINE_CASES]
    fallback = report.headline_cases(result)
    assert fallback and len({c["case"]["dtype"] for c in fallback}) == 1
    assert report.write_chart(result, tmp_path / "other.png") is not None
