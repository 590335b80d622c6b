"""MkDocs hook: put files that live outside ``docs/`` into the site, at the same path.

The Performance page shows the published benchmark chart
(``bench/results/published.png``, rewritten by ``make bench``) and the
example page shows ``make demo``'s figures (``examples/results/*.png``);
README embeds the same files.  Adding them here keeps one copy of each.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
EXTERNAL = ["bench/results/published.png", "examples/results/*.png"]


def on_files(files, config):
    for pattern in EXTERNAL:
        matches = sorted(ROOT.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"docs: nothing matches {pattern} (repository root {ROOT})")
        for path in matches:
            rel = path.relative_to(ROOT).as_posix()
            files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files
