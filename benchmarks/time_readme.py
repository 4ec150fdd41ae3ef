"""Wall-clock time of the README's first command and of ``examples/omniglot_quickstart.py``.

    python -m benchmarks.time_readme [--out benchmarks/results/readme_timings.md]

Both run as a new user runs them: in a fresh clone of this repository's HEAD
with ``../shared`` beside it (a link to the real one), starting from no
virtual environment. The README's first command is run step by step (its
``&&`` parts, in one shell each, in order), so the report gives creating the
environment, installing and the benchmark separately; the command's time is
their sum. The example then runs with the environment the first command made.
One run each: these are minutes-long commands, and the report states the
machine and its load average before and after every step, which is what their
time depends on. Writes the report and the README's timing sentence (between
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
from pathlib import Path

from benchmarks.perf.common import cpu_model, load_average

ROOT = Path(__file__).resolve().parents[1]
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


def measure(workdir: Path, log: Path) -> dict:
    """Clone HEAD into ``workdir/project``, then time the README command and the example."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    project = workdir / "project"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
    (workdir / "shared").symlink_to(ROOT.parent / "shared")
    command = readme_first_command(project / "README.md")
    steps = [_run_step(part.strip(), project, log) for part in command.split("&&")]
    example = _run_step(f".venv/bin/python {EXAMPLE}", project, log)
    return {"commit": commit, "command": command, "steps": steps, "example": example}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def report(result: dict) -> str:
    """The Markdown report of :func:`measure`'s result."""
    total = sum(step["seconds"] for step in result["steps"])
    lines = [
        "# How long the README's commands take",
        "",
        f"Measured by `python -m benchmarks.time_readme` at commit {result['commit']} on "
        f"{result['machine']}, {result['date']}; one run of each, wall-clock, in a fresh clone "
        f"with no virtual environment. {PACKAGES} Load average = 1, 5, 15 minute averages.",
        "",
        "| step | wall-clock | load before | load after |",
        "|---|---|---|---|",
    ]
    for step in [*result["steps"], result["example"]]:
        lines.append(
            f"| `{step['command']}` | {_minutes(step['seconds'])} | "
            f"{step['load_before']} | {step['load_after']} |"
        )
    lines += ["", f"The README's first command in all: {_minutes(total)}.", ""]
    return "\n".join(lines)


def readme_sentence(result: dict) -> str:
    """The sentence that goes between the README's timing markers."""
    steps = result["steps"]
    total = sum(step["seconds"] for step in steps)
    benchmark = steps[-1]["seconds"]
    return (
        f"Measured on {result['machine']} (load average {steps[0]['load_before'][0]} at the "
        f"start), at commit {result['commit']}: the first command took {_minutes(total)} "
        f"wall-clock, {_minutes(total - benchmark)} to create the environment and install and "
        f"{_minutes(benchmark)} for the benchmark; `python {EXAMPLE}` took "
        f"{_minutes(result['example']['seconds'])}. One run each, by `python -m "
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
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="time_readme_", dir=args.workdir))
    log = ROOT / "runs" / "time_readme.log"  # every step's output, for a failed step's tail
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    try:
        result = measure(workdir, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = f"{cpu_model()}, {os.cpu_count()} CPUs"
    result["date"] = time.strftime("%Y-%m-%d")
    args.out.write_text(report(result))
    write_readme_sentence(readme_sentence(result))
    print(report(result))
    return result


if __name__ == "__main__":
    main()
