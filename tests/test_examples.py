"""The examples run as written (on a small slice of the real data)."""

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "omniglot-py").is_dir(), reason=f"Omniglot not found under {DATA}")
def test_omniglot_quickstart_prints_the_table(monkeypatch, capsys):
    argv = ["omniglot_quickstart.py", "--data", str(DATA), "--classes", "24", "--seeds", "0"]
    monkeypatch.setattr(sys, "argv", argv + ["--iterations", "3", "--batch-size", "16"])
    runpy.run_path(str(ROOT / "examples" / "omniglot_quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "| embedder | P@1 | R-Precision | MAP@R |" in printed
    assert "| GlobalPoolEmbedder |" in printed and "| MultiHeadCRT |" in printed
