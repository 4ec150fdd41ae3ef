"""The tuning report: ``best.yaml``, ``<name>_tuning.md`` and its plots, in the tune folder.

:func:`report_search` writes, for every method, the trials counted, their summed time,
the best validation value and parameters, and the search spaces; the plots are
Optuna's optimisation history and parameter importances per method and the validation
curve of each method's best trial. With ``--publish DIR`` they are copied to ``DIR``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from benchmarks.protocol.layout import write_atomic
from benchmarks.protocol.provenance import environment
from benchmarks.reports.markdown import markdown_table

from .best_config import best_config, best_params
from .trials import best_trial, counted_trials, root_number, trial_minutes

__all__ = ["report_search"]


def _space_text(entry: Mapping[str, Any]) -> str:
    if entry["type"] == "categorical":
        return "one of " + ", ".join(f"`{json.dumps(c)}`" for c in entry["choices"])
    text = f"{entry['type']} in [{entry['low']:g}, {entry['high']:g}]"
    if entry.get("log"):
        text += ", log scale"
    if "step" in entry:
        text += f", step {entry['step']:g}"
    return text


IMPORTANCE_TRIALS = 20  # below this many complete trials, importances are mostly noise


def _readable(value: Any) -> str:
    """A parameter for reading: floats to 3 significant digits (best.yaml keeps them whole)."""
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value)


def _save_plots(
    studies: Mapping[str, optuna.Study], budget: int, folder: Path, prefix: str
) -> list[str]:
    """Optuna's optimisation history and parameter importances per method, and the best
    trials' validation curves; returns the file names written to ``folder``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name, study in studies.items():
        complete = [t for t in counted_trials(study, budget) if t.state == TrialState.COMPLETE]
        plots = [("history", optuna_plots.plot_optimization_history)]
        if len(complete) >= 2 and any(
            len({str(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params
        ):
            plots.append(("importance", optuna_plots.plot_param_importances))
        for kind, plot in plots:
            axes = plot(study)
            title = name
            if kind == "importance":
                title += f" ({len(complete)} complete trials)"
                if len(complete) < IMPORTANCE_TRIALS:
                    title += f": too few to rank parameters reliably (say {IMPORTANCE_TRIALS}+)"
            axes.figure.suptitle(title, y=1.02)
            path = f"{prefix}_{name}_{kind}.png"
            axes.figure.savefig(folder / path, dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
            written.append(path)
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, study in studies.items():
        trial = best_trial(study, budget)
        if trial is not None and trial.intermediate_values:
            steps = sorted(trial.intermediate_values)
            values = [100 * trial.intermediate_values[s] for s in steps]
            axes.plot(steps, values, marker="o", label=f"{name} (trial {trial.number})")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("epoch (folds one after another)")
    axes.set_ylabel("validation MAP@R (%)")
    axes.set_title("Validation curve of each method's best trial")
    if axes.lines:
        axes.legend()
    path = f"{prefix}_val_curves.png"
    figure.savefig(folder / path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return [*written, path]


def report_search(
    config: Mapping[str, Any],
    methods: Sequence[str],
    studies: Mapping[str, optuna.Study],
    spaces: Mapping[str, Mapping[str, Mapping[str, Any]]],
    budget: int,
    folder: Path,
    publish: str | Path | None,
    command: str | None = None,
) -> str:
    """Write ``best.yaml``, ``report.md`` and the plots to ``folder`` (and ``publish``).

    ``methods``: every method the search was asked for, ``studies`` those with a search.
    """
    name = str(config["name"])
    best = {m: best_params(study, spaces[m], budget) for m, study in studies.items()}
    tuned = best_config(config, best, methods, budget)
    header = f"# best parameters of {name} on validation classes (benchmarks/tune.py)\n"
    write_atomic(folder / "best.yaml", header + yaml.safe_dump(tuned, sort_keys=False))
    tune = config["tune"]
    env = environment()
    lines = [
        f"# {name}: every method tuned with the same budget on validation classes",
        "",
        f"Command: `{command or 'benchmarks.search.tune.search(...) from Python'}`  ",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs; commit `{env['git_commit']}`; "
        f"{env['started']}.  ",
        f"Budget: {budget} trials per method (complete or pruned; an attempt that died is run "
        "again from its resume point, not counted twice; a trial whose training diverged to "
        "NaN ends as pruned). Objective: mean validation "
        f"{config['eval']['primary_metric']} over folds {tune['folds']} and seeds "
        f"{tune['seeds']}; the test classes were never embedded. Sampler: Optuna TPE, seed "
        f"{tune['seed']} plus the trial's index; pruner: {tune['pruner']}.",
    ]
    header = ["method", "trials (complete + pruned)", "trial time, summed"]
    header += ["best validation MAP@R", "best trial"]
    header += ["best parameters (rounded; best.yaml has them whole)"]
    body = []
    for method, study in studies.items():
        counted = counted_trials(study, budget)
        pruned = sum(t.state == TrialState.PRUNED for t in counted)
        diverged = sum("diverged" in t.user_attrs for t in counted)
        minutes = trial_minutes(study)
        trial = best_trial(study, budget)
        value = "-" if trial is None else f"{100 * trial.value:.2f}"
        params = ", ".join(f"`{k}` = `{_readable(v)}`" for k, v in best[method].items())
        number = "-" if trial is None else str(trial.number)
        if trial is not None and root_number(trial) != trial.number:  # a retry, in its folder
            number += f" (folder trial{root_number(trial):04d})"
        trials = f"{len(counted) - pruned} + {pruned}"
        trials += f" ({diverged} diverged)" if diverged else ""
        body.append([method, trials, f"{minutes:.1f} min", value, number, params or "-"])
    spaces_body = [
        [method, f"`{key}`", _space_text(entry)]
        for method in studies
        for key, entry in spaces[method].items()
    ]
    lines += [
        "",
        markdown_table(header, body),
        "",
        "## Search spaces",
        "",
        markdown_table(["method", "key", "space"], spaces_body),
        "",
        "The final runs on test classes: "
        f"`python -m benchmarks.run --config {folder / 'best.yaml'}`.",
        "",
    ]
    prefix = f"{name}_tuning"
    plots = _save_plots(studies, budget, folder, prefix)
    lines += [f"![{path}]({path})" for path in plots] + [""]
    text = "\n".join(lines)
    write_atomic(folder / f"{prefix}.md", text)
    if publish is not None:
        target = Path(publish)
        target.mkdir(parents=True, exist_ok=True)
        for path in [f"{prefix}.md", *plots]:
            shutil.copyfile(folder / path, target / path)
        shutil.copyfile(folder / "best.yaml", target / f"{prefix}_best.yaml")
    return text
