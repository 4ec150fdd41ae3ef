"""MkDocs hook: the benchmark reports become pages of the site, read in place.

Every file under ``benchmarks/results/`` (reports and plots) and ``benchmarks/README.md``
is added to the site at the same path, so the documentation links to them as
``benchmarks/results/<name>.md`` and ``mkdocs build --strict`` checks every such link.
Nothing is copied into ``docs/``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("benchmarks/README.md", "benchmarks/results")


def on_files(files: Files, config) -> Files:  # noqa: ANN001 (MkDocs' hook signature)
    for source in SOURCES:
        path = ROOT / source
        for item in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if item.is_file() and item.suffix in (".md", ".png"):
                uri = item.relative_to(ROOT).as_posix()
                files.append(File.generated(config, uri, abs_src_path=str(item)))
    return files
