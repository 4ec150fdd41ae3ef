"""Wall-clock time of the README's first command and of ``examples/omniglot_quickstart.py``.

    python -m benchmarks.time_readme [--repeats 3] [--out benchmarks/results/readme_timings.md]

Both run as a new user runs them: in a fresh clone of this repository's HEAD
with ``../shared`` beside it (a link to the real one), starting from no
virtual environment. The README's first command is run step by step (its
``&&`` parts, in one shell each, in order), so the report gives creating the
environment, installing and the benchmark separately; the command's time is
their sum. The example then runs with the environment the first command made.
All of it is repeated ``--repeats`` times, each in a new clone, and reported as
mean ± 95% CI, with the machine and its load average before and after every
step, which is what the times depend on. Writes the report and the README's timing sentence (between
``<!-- timings:start -->`` and ``<!-- timings:end -->``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks.perf.common import cpu_model, load_average
from pml_crt.utils.stats import format_mean_ci

from .markdown import markdown_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REPORT = ROOT / "benchmarks" / "results" / "readme_timings.md"
EXAMPLE = "examples/omniglot_quickstart.py --data ../shared/data"
PACKAGES = (
    "pip installed from the machine's package index and download cache as they were; "
    "where torch must be downloaded, installing takes longer."
)
MARKERS = ("<!-- timings:start -->", "<!-- timings:end -->")


def readme_first_command(readme: Path = README) -> str:
    """The first line of the README's first code block: the main job's command."""
    block = re.search(r"^```bash\n(.*?)^```", readme.read_text(), flags=re.M | re.S)
    if block is None:
        raise ValueError(f"{readme} has no bash block")
    return block.group(1).strip().splitlines()[0]


def _run_step(command: str, cwd: Path, log: Path) -> dict:
    """Run one shell step, returning its wall time and the load around it."""
    before = load_average()
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {command}\n")
        out.flush()
        completed = subprocess.run(
            ["bash", "-c", command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"`{command}` exited with {completed.returncode}:\n{tail}")
    return {
        "command": command,
        "seconds": seconds,
        "load_before": before,
        "load_after": load_average(),
    }


def measure_once(workdir: Path, log: Path) -> dict:
    """Clone HEAD into ``workdir/project``, then time the README command and the example.

    Returns ``{"command", "steps": [{command, seconds, load_before, load_after}, ...]}``,
    the README command's ``&&`` steps followed by the example.
    """
    project = workdir / "project"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
    (workdir / "shared").symlink_to(ROOT.parent / "shared")
    command = readme_first_command(project / "README.md")
    parts = [part.strip() for part in command.split("&&")] + [f".venv/bin/python {EXAMPLE}"]
    return {"command": command, "steps": [_run_step(part, project, log) for part in parts]}


def _minutes(seconds: Sequence[float]) -> str:
    """Mean ± 95% CI over the runs, in minutes."""
    return format_mean_ci(list(seconds), scale=1 / 60, digits=1) + " min"


def _totals(result: dict) -> dict[str, list[float]]:
    """Per run: the README command, its install part, its benchmark, and the example."""
    runs = result["runs"]
    command = [sum(step["seconds"] for step in run["steps"][:-1]) for run in runs]
    benchmark = [run["steps"][-2]["seconds"] for run in runs]
    return {
        "command": command,
        "install": [c - b for c, b in zip(command, benchmark, strict=True)],
        "benchmark": benchmark,
        "example": [run["steps"][-1]["seconds"] for run in runs],
    }


def _loads(per_run: Iterable[list[float]]) -> str:
    """Each run's load averages as code (``[a, b]`` would read as a Markdown link)."""
    return " ".join(f"`{loads}`" for loads in per_run)


def report(result: dict) -> str:
    """The Markdown report of :func:`main`'s result."""
    runs = result["runs"]
    lines = [
        "# How long the README's commands take",
        "",
        f"Measured by `python -m benchmarks.time_readme --repeats {len(runs)}` at commit "
        f"{result['commit']} on {result['machine']}, {result['date']}: wall-clock, mean ± 95% "
        f"CI over {len(runs)} runs, each in a fresh clone with no virtual environment. "
        f"{PACKAGES} Load average = 1, 5, 15 minute averages before and after each run's step.",
        "",
    ]
    header = ["step", "wall-clock", "load before, per run", "load after, per run"]
    body = []
    for index, step in enumerate(runs[0]["steps"]):
        steps = [run["steps"][index] for run in runs]
        body.append(
            [
                f"`{step['command']}`",
                _minutes([s["seconds"] for s in steps]),
                _loads(s["load_before"] for s in steps),
                _loads(s["load_after"] for s in steps),
            ]
        )
    totals = _totals(result)
    lines += [markdown_table(header, body), ""]
    lines += [f"The README's first command in all: {_minutes(totals['command'])}.", ""]
    return "\n".join(lines)


def readme_sentence(result: dict) -> str:
    """The sentence that goes between the README's timing markers."""
    totals = _totals(result)
    first_loads = [run["steps"][0]["load_before"][0] for run in result["runs"]]
    return (
        f"Measured on {result['machine']} at commit {result['commit']} (mean ± 95% CI over "
        f"{len(result['runs'])} runs, 1-minute load average {min(first_loads)} to "
        f"{max(first_loads)} at their start): the first command took "
        f"{_minutes(totals['command'])} wall-clock, {_minutes(totals['install'])} to create the "
        f"environment and install and {_minutes(totals['benchmark'])} for the benchmark; "
        f"`python {EXAMPLE}` took {_minutes(totals['example'])}. By `python -m "
        "benchmarks.time_readme` ([readme_timings.md](benchmarks/results/readme_timings.md)). "
        + PACKAGES
    )


def write_readme_sentence(sentence: str, readme: Path = README) -> None:
    text = readme.read_text()
    start, end = (text.index(marker) for marker in MARKERS)
    readme.write_text(text[: start + len(MARKERS[0])] + "\n" + sentence + "\n" + text[end:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPORT, help="the Markdown report")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to clone (default: a temporary folder)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command")
    args = parser.parse_args(argv)
    log = ROOT / "runs" / "time_readme.log"  # every step's output, for a failed step's tail
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    runs = []
    for _ in range(args.repeats):
        workdir = Path(tempfile.mkdtemp(prefix="time_readme_", dir=args.workdir))
        try:
            runs.append(measure_once(workdir, log))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"commit": commit, "runs": runs}
    result["machine"] = f"{cpu_model()}, {os.cpu_count()} CPUs"
    result["date"] = time.strftime("%Y-%m-%d")
    args.out.write_text(report(result))
    write_readme_sentence(readme_sentence(result))
    print(report(result))
    return result
