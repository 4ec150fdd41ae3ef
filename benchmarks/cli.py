"""The benchmark commands' argument parsers and how a command ends, with nothing heavy imported.

``python -m benchmarks.run``, ``.tune`` and ``.mlrc_table`` parse their arguments with
these parsers before they import torch or Optuna, so ``--help`` and a mistyped option
answer at once. Each description says what the command does in stages, where its
outputs go, that it resumes, and how long the shipped configs took, read from the
published reports in ``benchmarks/results/``. :func:`run_command` ends every command
the same way: a user error in one line with status 2, Ctrl-C with how to resume and
status 130.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

__all__ = [
    "exit_with",
    "mlrc_table_parser",
    "published_minutes",
    "run_command",
    "run_parser",
    "tune_parser",
]

T = TypeVar("T")

RESULTS = Path(__file__).resolve().parent / "results"
_PATTERNS = {
    "run": (r"Time of the \d+ finished units, summed: ([\d.]+) min", "{}.md"),
    "tune": (r"^\| [\w-]+ \| \d+ \+ \d+[^|]*\| ([\d.]+) min \|", "{}_tuning.md"),
    "mlrc_table": (r"Measured wall time: ([\d.]+) min", "{}_mlrc.md"),
}
_SHIPPED = {
    "run": ("omniglot_quick", "omniglot7x7_tune_tuned", "cub224_tune_tuned"),
    "tune": ("omniglot7x7_tune", "cub224_tune"),
    "mlrc_table": ("omniglot7x7_mlrc13", "cub224_mlrc13"),
}


def published_minutes(command: str, name: str, results: Path = RESULTS) -> float | None:
    """Minutes the published report of ``name`` measured for ``command``; None if absent.

    ``run``: the summed unit time of ``<name>.md``; ``tune``: the summed trial time of
    every method in ``<name>_tuning.md``; ``mlrc_table``: the measured wall time of
    ``<name>_mlrc.md``.
    """
    pattern, file = _PATTERNS[command]
    path = results / file.format(name)
    if not path.is_file():
        return None
    found = re.findall(pattern, path.read_text(), flags=re.M)
    return sum(float(minutes) for minutes in found) if found else None


def _times(command: str, what: str) -> str:
    measured = [
        f"{name}: {minutes:.0f} min"
        for name in _SHIPPED[command]
        if (minutes := published_minutes(command, name)) is not None
    ]
    if not measured:
        return ""
    return (
        f"\n\nMeasured on 2 CPUs ({what}, from benchmarks/results/): " + "; ".join(measured) + "."
    )


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose description keeps its paragraphs, each wrapped to 88 columns."""
    paragraphs = [textwrap.fill(text, 88) for text in description.split("\n\n")]
    return argparse.ArgumentParser(
        prog=prog,
        description="\n\n".join(paragraphs),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _common(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override a config value with a YAML value, e.g. --set training.num_epochs=2 "
        "(repeatable)",
    )


def run_parser() -> argparse.ArgumentParser:
    """``python -m benchmarks.run``'s parser."""
    parser = _parser(
        "python -m benchmarks.run",
        "Run a benchmark config: the MLRC protocol with stock PML parts.\n\n"
        "Stages: check the config, the data and every method's arguments (a user error is "
        "one line, nothing written); train and evaluate each unit (method x seed x fold) "
        "under <out>/<name>/<method>/seed<S>/fold<F>/; write the table (mean ± 95% CI over "
        "seeds) to <out>/<name>/table.md and, with --publish, to DIR/<name>.md and .csv. "
        "Running the same command again resumes: finished units are skipped, an interrupted "
        "one continues from its last completed epoch." + _times("run", "units' time, summed"),
    )
    _common(parser, "a YAML config, e.g. benchmarks/configs/omniglot_quick.yaml")
    parser.add_argument(
        "--out", default="runs", help="parent folder of the run folder (default runs/)"
    )
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local processes that share the units, each with an equal share of the cores "
        "unless the config pins threads (default 1)",
    )
    parser.add_argument(
        "--publish",
        default=None,
        metavar="DIR",
        help="also write the table with its provenance to DIR/<name>.md and DIR/<name>.csv "
        "(the committed reports live in benchmarks/results)",
    )
    parser.add_argument("--verbose", action="store_true", help="show PML's INFO logs")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide every progress bar (the caches' and PML's training and testing bars)",
    )
    return parser


def tune_parser() -> argparse.ArgumentParser:
    """``python -m benchmarks.tune``'s parser."""
    parser = _parser(
        "python -m benchmarks.tune",
        "Fair tuning: an Optuna search per method on validation classes, as MLRC tuned "
        "every loss.\n\n"
        "Stages: check the config, the data, every method's arguments, every search-space "
        "key and --storage (a user error is one line, nothing written); run each method's "
        "study (TPE, pruning) with the same trial budget, each trial's units under "
        "<out>/<name>/tune/<method>/trial<NNNN>/; write best.yaml (each searched method's "
        "best parameters) and <name>_tuning.md to <out>/<name>/tune/ (with --publish, to "
        "DIR too), then print the benchmarks.run command for the final runs on test "
        "classes. Running the same command again resumes: finished trials are kept and a "
        "trial whose process died runs again from its last validated epoch."
        + _times("tune", "trial time, summed over methods"),
    )
    _common(parser, "a YAML config with search spaces, e.g. benchmarks/configs/omniglot_tune.yaml")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="tune only these methods (default: all)"
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="trials per method (default: tune.trials)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="local worker processes per study (default 1)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="an Optuna RDB URL shared by processes on several machines, e.g. "
        "postgresql+psycopg2://user@host/db (default: a journal file in the tune folder)",
    )
    parser.add_argument("--out", default="runs", help="run folder root (default runs/)")
    parser.add_argument(
        "--publish", default=None, metavar="DIR", help="also copy the report and best.yaml here"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide every progress bar")
    return parser


def mlrc_table_parser() -> argparse.ArgumentParser:
    """``python -m benchmarks.mlrc_table``'s parser."""
    parser = _parser(
        "python -m benchmarks.mlrc_table",
        "MLRC's Table 4 with CRT: every loss with the linear embedder and with "
        "MultiHeadCRT, tuned with the same budget, then run on the test classes.\n\n"
        "Stages: tune every <loss>_linear and <loss>_crt method (as benchmarks.tune, under "
        "<out>/<name>/tune/); run each best setting over the config's seeds on the test "
        "classes (as benchmarks.run); write <name>_mlrc.md (MLRC's layout, the paired "
        "MultiHeadCRT - linear MAP@R per loss, budgets and measured time) and its plot, to "
        "--publish DIR too. Running the same command again resumes both stages. "
        "--methods and --trials make a small try in minutes."
        + _times("mlrc_table", "wall time, all stages"),
    )
    _common(parser, "a config of <loss>_linear/_crt methods, e.g. omniglot7x7_mlrc13.yaml")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these methods, e.g. ms_linear ms_crt (default: all)",
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="trials per method (default: tune.trials)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local processes per study, then sharing the final units (default 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs"), help="run folder root")
    parser.add_argument("--publish", type=Path, default=None, help="also write the reports here")
    parser.add_argument("--no-progress", action="store_true", help="hide every progress bar")
    return parser


def run_command(prog: str, action: Callable[[], T], interrupted: str) -> T:
    """``action()`` as a command line's body, the way ``benchmarks.run`` and ``.tune`` end.

    A :class:`~benchmarks.protocol.config.UserError` prints ``<prog>: error: <message>`` as one
    line and exits with status 2, as argparse does; Ctrl-C prints ``interrupted`` (how
    to resume) and exits with 130. Any other exception is a bug and propagates.
    """
    from benchmarks.protocol.config import UserError  # here, so that --help does not load it

    try:
        return action()
    except UserError as error:
        exit_with(2, "error: " + " ".join(str(error).splitlines()), prog)
    except KeyboardInterrupt:
        exit_with(130, interrupted, prog)


def exit_with(status: int, message: str, prog: str = "benchmarks.run") -> NoReturn:
    """Print ``<prog>: <message>`` to stderr (rank 0 only) and exit with ``status``."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
