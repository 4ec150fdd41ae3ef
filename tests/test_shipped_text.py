"""The package's own text cites nothing that the wheel does not ship.

Docstrings and comments of ``pml_crt`` are read by users of the installed wheel,
which holds neither the specification nor ``benchmarks/`` and its reports: the
text must state the fact itself, not point to a repository file.
"""

import re
from pathlib import Path

import pytest

import pml_crt

PACKAGE = Path(pml_crt.__file__).resolve().parent
REPOSITORY_ONLY = re.compile(r"\bSPEC\b|\bbenchmarks[/.]|ablation\.md|\bperf/|\bperf\.md")
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_sources_are_found():
    assert PACKAGE / "models" / "crt.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_reference_to_repository_only_files(path):
    cited = [
        f"line {number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if REPOSITORY_ONLY.search(line)
    ]
    assert not cited, "\n".join(cited)
