"""Every ```python block of README.md and docs/**/*.md runs as written.

How the blocks run (also described in docs/contributing.md):

* The ```python blocks of one file run **in sequence, in one namespace**, like
  a tutorial read from the top: a later block may use names an earlier one
  defined.  Each file runs in a fresh temporary directory (``bn.save("bn.npz")``
  writes there).  Other fences (```bash, ```text, ```yaml, ```pycon) are not run.
* An HTML comment on the line(s) just before a fence marks the block:

  - ``<!-- test: requires torch -->`` (or ``mpi4py``, several names separated by
    spaces): the block runs only in the test for that requirement, which is
    skipped with a message when the package is missing.  That test runs the
    file's plain blocks and the blocks whose requirements it has, in order.
  - ``<!-- test: skip REASON -->``: never run (for a block that needs
    ``mpiexec -n 4`` or a model of the reader's own); the reason is required.

An example that drifts from the API (a renamed argument, a removed function,
a name used before it is defined) fails here, so CI turns red.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
MARKER = re.compile(r"<!--\s*test:\s*(?P<kind>requires|skip)\b(?P<arg>[^>]*?)\s*-->")


def extract_blocks(path: Path) -> list[dict]:
    """The ```python blocks of a Markdown file, with their markers and line numbers."""
    lines = path.read_text().splitlines()
    blocks, i, pending = [], 0, []
    while i < len(lines):
        line = lines[i]
        marker = MARKER.search(line)
        if marker:
            pending.append((marker["kind"], marker["arg"].split()))
            i += 1
            continue
        m = FENCE.match(line)
        if not m:
            if line.strip():
                pending = []  # a marker applies to the next fence only
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        lang = m["info"].strip().split(" ", 1)[0].split("{", 1)[0].lower()
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip()
                for ln in lines[start:j]]
        if lang in ("python", "py"):
            requires = sorted({name for kind, args in pending if kind == "requires"
                               for name in args})
            skip = [" ".join(args) for kind, args in pending if kind == "skip"]
            blocks.append({"line": start + 1, "code": "\n".join(body) + "\n",
                           "requires": requires, "skip": skip})
        pending = []
        i = j + 1
    return blocks


def _cases():
    for path in FILES:
        blocks = extract_blocks(path)
        if not blocks:
            continue
        rel = path.relative_to(ROOT).as_posix()
        yield pytest.param(path, (), id=rel)
        for req in sorted({tuple(b["requires"]) for b in blocks if b["requires"]}):
            yield pytest.param(path, req, id=f"{rel}[{'+'.join(req)}]")


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize(("path", "requires"), list(_cases()))
def test_examples_run(path, requires, tmp_path, monkeypatch):
    missing = _missing(requires)
    if missing:
        pytest.skip(f"{path.name}: examples need {', '.join(missing)}, not installed")
    blocks = extract_blocks(path)
    for block in blocks:
        if block["skip"] and not all(block["skip"]):
            pytest.fail(f"{path.name}:{block['line']}: '<!-- test: skip -->' needs a reason")
    run = [b for b in blocks if not b["skip"] and set(b["requires"]) <= set(requires)]
    if requires:
        run_reqs = [b for b in run if b["requires"]]
        assert run_reqs, "no block with these requirements"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs_example__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN examples warn on purpose
        for block in run:
            where = f"{path.relative_to(ROOT)}:{block['line']}"
            try:
                code = compile(block["code"], where, "exec")
            except SyntaxError as exc:
                pytest.fail(f"{where}: the example does not parse: {exc}")
            try:
                exec(code, namespace)
            except Exception as exc:
                raise AssertionError(f"{where}: the example raised "
                                     f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------
# The collector itself
# ---------------------------------------------------------------------------


def test_extract_blocks_markers_and_languages(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "text\n\n```python\na = 1\n```\n\n```bash\nmake test\n```\n\n"
        "<!-- test: requires torch -->\n```python title=\"t.py\"\nimport torch\n```\n\n"
        "<!-- test: skip needs mpiexec -n 4 -->\n\n```python\nraise SystemExit\n```\n\n"
        "<!-- test: requires mpi4py -->\nsome words in between\n```python\nb = a\n```\n\n"
        "- item\n\n    ```python\n    c = 2\n    ```\n")
    blocks = extract_blocks(md)
    assert [b["code"] for b in blocks] == ["a = 1\n", "import torch\n", "raise SystemExit\n",
                                           "b = a\n", "c = 2\n"]
    assert blocks[1]["requires"] == ["torch"]
    assert blocks[2]["skip"] == ["needs mpiexec -n 4"]
    assert blocks[3]["requires"] == []  # the marker was not just before the fence
    assert blocks[0]["line"] == 4


def test_every_docs_page_with_python_is_collected():
    """README and the guide pages do have examples, so a collector bug cannot hide them."""
    ids = {p.id for p in _cases()}
    for name in ("README.md", "docs/getting-started.md", "docs/guide/functional.md",
                 "docs/guide/layer.md", "docs/guide/errors.md"):
        assert name in ids
    assert "docs/guide/pytorch.md[torch]" in ids
    assert "docs/guide/distributed.md[mpi4py]" in ids


def test_examples_parse():
    """Even blocks that are skipped or need missing packages are valid Python."""
    for path in FILES:
        for block in extract_blocks(path):
            ast.parse(block["code"], f"{path.name}:{block['line']}")


def test_no_output_prompts_in_python_blocks():
    """```python blocks hold code, not a REPL session (those are ```pycon and not run)."""
    for path in FILES:
        for block in extract_blocks(path):
            assert not block["code"].lstrip().startswith(">>>"), (path, block["line"])

