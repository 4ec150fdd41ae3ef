"""The README and the documentation as a user meets them: commands and Python blocks run as written.

The Python blocks of the README, then of the documentation pages in
``DOC_PAGES``, run in order, in one namespace, from a working directory
that has ``../shared`` beside it as the README assumes, with torchvision's
weights cache in a temporary ``$TORCH_HOME`` filled as the README says. Two
things are made smaller, and both are asserted to be present so that the
README cannot drift away from them: ``pml_crt.datasets.cub`` returns a slice
of each split (8 species, 4 images each), and ``trainer.train(num_epochs=10)``
runs 2 epochs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

import pml_crt.datasets

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = [ROOT / "docs" / "usage.md", ROOT / "docs" / "export.md"]  # continue README's namespace
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
CLASSES, IMAGES_PER_CLASS = 8, 4
EPOCHS = ("trainer.train(num_epochs=10)", "trainer.train(num_epochs=2)")


def _blocks(language: str, page: Path = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.M | re.S)


def test_readme_opens_with_the_two_setup_commands_ci_runs():
    text = README.read_text()
    first_block = re.search(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)
    assert first_block.group(1) == "bash"
    install_and_run, tests = first_block.group(2).strip().splitlines()
    assert "pip install" in install_and_run and "-m benchmarks.run --config" in install_and_run
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), f"{tests!r} is not the test command .ci/run runs"


def _small_cub(full_cub):
    """``cub`` returning the first ``CLASSES`` classes with ``IMAGES_PER_CLASS`` images each."""

    def small_cub(root, split="train", transform=None, **kwargs):
        dataset = full_cub(root, split, transform, class_subset=range(CLASSES), **kwargs)
        keep = [
            i
            for i, y in enumerate(dataset.labels)
            if dataset.labels[:i].count(y) < IMAGES_PER_CLASS
        ]
        dataset.paths = [dataset.paths[i] for i in keep]
        dataset.labels = [dataset.labels[i] for i in keep]
        return dataset

    return small_cub


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "data" / "CUB_200_2011").is_dir() or not WEIGHTS.is_file(),
    reason=f"CUB or the MobileNetV2 weights not found under {SHARED} (see SPEC section 4)",
)
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = _blocks("python")
    assert blocks[0].count(EPOCHS[0]) == 1
    blocks[0] = blocks[0].replace(*EPOCHS)
    sources = [README] * len(blocks)
    for page in DOC_PAGES:
        page_blocks = _blocks("python", page)
        assert page_blocks, f"{page} has no Python block"
        blocks += page_blocks
        sources += [page] * len(page_blocks)

    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(WEIGHTS, checkpoints)  # the README's one-line offline step
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    (tmp_path / "shared").symlink_to(SHARED)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setattr(pml_crt.datasets, "cub", _small_cub(pml_crt.datasets.cub))

    namespace: dict = {"__name__": "__readme__"}
    for block, source in zip(blocks, sources, strict=True):
        exec(compile(block, str(source), "exec"), namespace)

    printed = capsys.readouterr().out
    accuracies = namespace["tester"].all_accuracies["test"]
    for metric in ("precision_at_1", "r_precision", "mean_average_precision_at_r"):
        value = accuracies[f"{metric}_level0"]
        assert 0.0 <= value <= 1.0 and repr(value) in printed
    assert len(namespace["train_set"]) == len(namespace["test_set"]) == CLASSES * IMAGES_PER_CLASS
    assert namespace["trainer"].epoch == 2

    model, example = namespace["model"], namespace["example"]
    with torch.no_grad():
        expected = model(example)
        assert expected.shape == (2, 512)
        exported = namespace["program"].module()(example)
        traced = namespace["traced"](example)
    # the same float32 graph: only reordering of sums differs
    scale = expected.abs().max()
    for result in (exported, traced):
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-5 * float(scale))
    for name in ("model.pt2", "model.onnx"):
        assert (tmp_path / "project" / name).is_file()


def test_timing_script_reads_the_first_command_and_rewrites_only_its_sentence(tmp_path):
    from benchmarks.reports import time_readme

    text = README.read_text()
    assert time_readme.readme_first_command() == text.split("```bash\n")[1].splitlines()[0]
    copy = tmp_path / "README.md"
    copy.write_text(text)
    time_readme.write_readme_sentence("It took 1.0 min.", copy)
    before, _, after = text.partition(time_readme.MARKERS[0])
    rewritten = copy.read_text()
    assert rewritten.startswith(before + time_readme.MARKERS[0] + "\nIt took 1.0 min.\n")
    assert rewritten.endswith(time_readme.MARKERS[1] + after.partition(time_readme.MARKERS[1])[2])
    assert rewritten.count("It took") == 1


def test_timing_report_gives_mean_and_ci_over_runs():
    from benchmarks.reports import time_readme

    def run(seconds):
        steps = ["python3 -m venv .venv", "pip install", "benchmarks.run", "example"]
        return {
            "steps": [
                {"command": c, "seconds": s, "load_before": [0.5], "load_after": [1.0]}
                for c, s in zip(steps, seconds, strict=True)
            ]
        }

    result = {
        "commit": "abc",
        "machine": "CPU, 2 CPUs",
        "date": "today",
        "runs": [run([6, 84, 60, 180]), run([6, 90, 66, 174]), run([6, 96, 72, 168])],
    }
    # command per run: 150, 162, 174 s -> 2.7 min ± t(2) * 12 s / sqrt(3) = 0.497 min;
    # install 90, 96, 102 s, benchmark 60, 66, 72 s, example 180, 174, 168 s: ± 0.248 min
    sentence = time_readme.readme_sentence(result)
    assert "the first command took 2.7 ± 0.5 min wall-clock" in sentence
    assert "1.6 ± 0.2 min to create the environment and install" in sentence
    assert "1.1 ± 0.2 min for the benchmark" in sentence
    assert "took 2.9 ± 0.2 min" in sentence and "over 3 runs" in sentence
    assert "| `benchmarks.run` | 1.1 ± 0.2 min | `[0.5]` `[0.5]` `[0.5]` |" in time_readme.report(
        result
    )


def test_readme_results_table_is_the_generated_one():
    from benchmarks.reports import verdicts

    text = README.read_text()
    assert verdicts.readme_with(text, verdicts.table()) == text, (
        "run python -m benchmarks.verdicts --write"
    )


REPORT_LINK = re.compile(r"\]\((benchmarks/results/[^)\s]+\.(?:md|csv))\)")
# 4.60, +2.35, 0.544: a figure as the reports print it (not a version such as 2.14.1)
FIGURE = re.compile(r"(?<![\w.])[+-]?(\d+\.\d{2,})(?![\w.])")


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_quoted_figures_are_in_the_reports_linked_beside_them(page):
    """Every figure with two or more decimals in a paragraph or list item of prose is printed,
    as written, in a report that paragraph links: a typo or a stale figure fails."""
    text = re.sub(r"^```.*?^```", "", (ROOT / page).read_text(), flags=re.M | re.S)
    checked = 0
    for part in re.split(r"\n\s*\n|\n(?=- )", text):
        figures = FIGURE.findall(part)
        if not figures:
            continue
        links = REPORT_LINK.findall(part)
        assert links, f"{page}: figures {figures} with no report linked beside them: {part[:80]!r}"
        reports = "".join((ROOT / link).read_text() for link in links)
        missing = [figure for figure in figures if figure not in reports]
        assert not missing, f"{page}: {missing} are in none of {links}"
        checked += len(figures)
    assert checked >= 10  # the pages quote reports; a broken pattern would check nothing


@pytest.mark.parametrize(
    "package", ["models", "losses", "regularizers", "trunks", "datasets", "utils"]
)
def test_the_api_reference_documents_every_public_name(package):
    import importlib
    import types

    module = importlib.import_module(f"pml_crt.{package}")
    reference = (ROOT / "docs" / "api" / f"{package}.md").read_text()
    for name in module.__all__:
        value = getattr(module, name)
        path = (
            value.__name__ if isinstance(value, types.ModuleType) else f"{value.__module__}.{name}"
        )
        assert f"::: {path}\n" in reference, f"docs/api/{package}.md lacks ::: {path}"
