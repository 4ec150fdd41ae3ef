"""benchmarks.tune: Optuna searches on validation classes, resumable and shared by workers.

A tiny Omniglot search (16 characters, a small convnet, 3 epochs of 5 iterations,
4 trials of one method) runs uninterrupted once, in process. Then:

- a real ``python -m benchmarks.tune`` process is killed in the middle of its
  second trial and the same command is run again: every trial, its parameters,
  its pruning and its value equal the uninterrupted search's, the killed trial
  ran again from its resume point in its own folder, and nothing ran twice;
- two worker processes share one study, in Optuna's journal file and in a real
  PostgreSQL server: their trials are distinct and together make the study.

Every process pins one thread (``threads: 1``): results depend on the thread count.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from pytorch_metric_learning import testers

from benchmarks.protocol.config import load_config, method_config, method_names
from benchmarks.protocol.layout import RESULTS
from benchmarks.protocol.pipeline import DataPipeline
from benchmarks.protocol.results import table_header
from benchmarks.protocol.splits import mlrc_split
from benchmarks.search import tune
from benchmarks.search.best_config import best_config
from benchmarks.search.space import SearchSpaceError, decode_params, search_space, suggest
from benchmarks.search.storage import JOURNAL, open_storage
from benchmarks.search.study import tune_method
from benchmarks.search.trials import best_trial, counted_trials, root_number
from pml_crt.utils.validation import NonFiniteError
from tests.test_benchmark_resume import (
    HANG_GUARD_S,
    _kill_at_marker,
    _marker_epoch,
    _start,
    _wait_for_marker,
)

pytest_plugins = ["postgres_server"]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
needs_omniglot = pytest.mark.skipif(
    not (DATA / "omniglot-py" / "images_background").is_dir(),
    reason=f"Omniglot not found under {DATA} (see SPEC section 4)",
)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

TRIALS = 4
TINY = {
    "name": "tiny_tune",
    "seeds": [0],
    "folds": [0],
    "device": "cpu",
    "threads": 1,
    "dataset": {"name": "omniglot", "root": str(DATA), "max_classes": 16},
    "images": {"resize": 28, "normalize": "invert"},
    "trunk": {"name": "small_convnet", "kwargs": {"channels": [16, 16, 16], "pool_last": False}},
    "loss": {"name": "MultiSimilarityLoss"},
    "miner": {"name": "MultiSimilarityMiner"},
    "training": {
        "batch_size": 12,
        "iterations_per_epoch": 5,
        "num_epochs": 3,
        "patience": None,
        "log_freq": 5,
        "num_workers": 0,
    },
    "eval": {"batch_size": 64},
    "search_space": {
        "optimizers.default.kwargs.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}
    },
    "tune": {
        "trials": TRIALS,
        "pruner": {"name": "median", "kwargs": {"n_startup_trials": 1, "n_warmup_steps": 1}},
    },
    "methods": {
        "global_pool": {
            "embedder": {"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 32}},
            "search_space": {
                "embedder.kwargs.pooling": {"type": "categorical", "choices": ["avg", "gem"]}
            },
        }
    },
}
TRIAL_FOLDERS = Path("tiny_tune") / "tune" / "global_pool"


def _config_file(folder: Path) -> Path:
    path = folder / "tiny_tune.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _study(out: Path, storage: str | None = None) -> optuna.Study:
    storage = storage or str(out / "tiny_tune" / "tune" / JOURNAL)
    return optuna.load_study(study_name="tiny_tune/global_pool", storage=open_storage(storage))


def _trials(study: optuna.Study) -> list[tuple]:
    """What a search decided: each counted trial's parameters, pruning, steps and value."""
    return [
        (t.params, t.state, dict(t.intermediate_values), t.value)
        for t in counted_trials(study, TRIALS)
    ]


# --------------------------------------------------------------------------- search spaces


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"type": "uniform", "low": 0, "high": 1}, "type one of"),
        ({"type": "float", "low": 1.0, "high": 0.5}, "low < high"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "low > 0 with log"),
        ({"type": "int", "low": 1.5, "high": 4}, "integer low and high"),
        ({"type": "categorical", "choices": []}, "non-empty list"),
        ({"type": "float", "low": 0, "high": 1, "scale": 2}, "unknown keys"),
    ],
)
def test_bad_search_space_entries_are_named(entry, message):
    config = load_config(data={"search_space": {"training.margin": entry}})
    with pytest.raises(SearchSpaceError, match=rf"search_space\['training.margin'\].*{message}"):
        search_space(config)


def test_a_key_that_does_not_fit_the_config_is_named():
    space = {"training.batch_size.size": {"type": "int", "low": 8, "high": 16}}
    config = method_config(load_config(data={"methods": {"m": {"search_space": space}}}), "m")
    with pytest.raises(SearchSpaceError, match=r"methods\.m\.search_space.*batch_size"):
        search_space(config)


def test_methods_extend_and_drop_the_shared_space():
    config = load_config(
        data={
            "search_space": {
                "optimizers.default.kwargs.lr": {"type": "float", "low": 1e-5, "high": 1e-2},
                "loss.kwargs.alpha": {"type": "float", "low": 1, "high": 4},
            },
            "methods": {
                "a": {"search_space": {"loss.kwargs.alpha": None}},
                "b": {"search_space": {"training.m": {"type": "int", "low": 2, "high": 8}}},
            },
        }
    )
    assert list(search_space(method_config(config, "a"))) == ["optimizers.default.kwargs.lr"]
    assert list(search_space(method_config(config, "b"))) == [
        "optimizers.default.kwargs.lr",
        "loss.kwargs.alpha",
        "training.m",
    ]


def test_suggested_values_follow_their_space_and_decode_back():
    space = search_space(
        load_config(
            data={
                "search_space": {
                    "optimizers.default.kwargs.lr": {
                        "type": "float",
                        "low": 1e-4,
                        "high": 1e-2,
                        "log": True,
                    },
                    "training.m": {"type": "int", "low": 2, "high": 8, "step": 2},
                    "embedder.kwargs.heads": {
                        "type": "categorical",
                        "choices": [[[8, 64], [4, 32]], [[16, 128]]],
                    },
                }
            }
        )
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(12):
        trial = study.ask()
        params = suggest(trial, space)
        study.tell(trial, 0.0)
        assert 1e-4 <= params["optimizers.default.kwargs.lr"] <= 1e-2
        assert params["training.m"] in (2, 4, 6, 8)
        assert params["embedder.kwargs.heads"] in ([[8, 64], [4, 32]], [[16, 128]])
        assert decode_params(space, trial.params) == params
        seen.append(json.dumps(params["embedder.kwargs.heads"]))
    assert len(set(seen)) == 2


def test_best_yaml_is_a_config_the_runner_takes(tmp_path):
    config = load_config(data=TINY)
    best = {
        "global_pool": {"optimizers.default.kwargs.lr": 0.004, "embedder.kwargs.pooling": "gem"}
    }
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(best_config(config, best, ["global_pool"], TRIALS)))
    tuned = load_config(path)
    assert tuned["name"] == "tiny_tune_tuned" and tuned["search_space"] is None
    method = method_config(tuned, "global_pool")
    assert method["optimizers"]["default"] == {"name": "Adam", "kwargs": {"lr": 0.004}}
    assert method["embedder"] == {
        "type": "GlobalPoolEmbedder",
        "kwargs": {"embedding_size": 32, "pooling": "gem"},
        "init_from_data": None,
    }
    assert method["eval"]["split"] == "test" and tuned["seeds"] == TINY["seeds"]
    # The final runs' published table states the equal budget and where the search is.
    assert tuned["tune"]["tuned_from"] == "tiny_tune"
    header = table_header(tuned, SimpleNamespace(num_classes=16, labels=[0] * 320))
    assert (
        f"`global_pool` runs with the best of its {TRIALS} trials of `python -m benchmarks.tune` "
        "on validation classes (seeds [0], folds [0]): `tiny_tune_tuning.md`"
    ) in header
    assert "benchmarks.tune" not in table_header(config, SimpleNamespace(num_classes=16, labels=[]))


def test_best_yaml_holds_what_was_searched_and_the_table_says_so(tmp_path):
    # tune --methods a b frozen --trials 2 on a config of four methods: best.yaml keeps
    # a and b (searched, 2 trials) and frozen (no search space), and drops the others.
    methods = {
        name: {"embedder": {"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 32}}}
        for name in ("a", "b", "c")
    }
    methods["frozen"] = {"embedder": {"type": "frozen"}, "search_space": None}
    config = load_config(data={**TINY, "methods": methods})
    best = {"a": {"optimizers.default.kwargs.lr": 0.004}, "b": {}}
    tuned = best_config(config, best, ["a", "b", "frozen"], 2)
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(tuned))
    tuned = load_config(path)
    assert list(tuned["methods"]) == ["a", "b", "frozen"]
    assert tuned["tune"]["trials"] == 2 and TINY["tune"]["trials"] == TRIALS != 2
    assert tuned["tune"]["tuned_methods"] == ["a", "b"]
    assert tuned["tune"]["untuned_methods"] == ["frozen"]
    header = table_header(tuned, SimpleNamespace(num_classes=16, labels=[0] * 320))
    assert (
        "`a`, `b` run with the best of their 2 trials of `python -m benchmarks.tune` on "
        "validation classes (seeds [0], folds [0]): `tiny_tune_tuning.md`, the same budget for "
        "each; `frozen` had no search."
    ) in header
    assert "10 trials" not in header and "every method" not in header
    # A run of some of best.yaml's methods (run --methods b) names only those.
    source = SimpleNamespace(num_classes=16, labels=[0] * 320)
    header = table_header(tuned, source, ["b"])
    assert header.endswith(
        "`b` runs with the best of its 2 trials of `python -m benchmarks.tune` on validation "
        "classes (seeds [0], folds [0]): `tiny_tune_tuning.md`.\n\n"
    )
    assert table_header(tuned, source, ["frozen"]).endswith(". `frozen` had no search.\n\n")


@needs_omniglot
@pytest.mark.slow
def test_a_narrowed_search_then_run_publishes_a_true_budget_sentence(tmp_path):
    from benchmarks.protocol import runner as run_command

    methods = {
        "a": TINY["methods"]["global_pool"],
        "b": {"embedder": {"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 16}}},
        "frozen": {"embedder": {"type": "frozen"}, "search_space": None},
    }
    config = load_config(data={**TINY, "methods": methods})
    logged = []
    result = tune.search(
        config, tmp_path / "runs", methods=["a", "frozen"], trials=2, progress=False,
        log=logged.append,
    )  # fmt: skip
    best = result["folder"] / "best.yaml"
    assert logged[-1].endswith(
        f"the final runs on the test classes:\n  {run_command.cli_command(['--config', str(best)])}"
    )
    run_command.main(
        ["--config", str(best), "--out", str(tmp_path / "runs"), "--no-progress",
         "--publish", str(tmp_path / "published")]
    )  # fmt: skip
    table = (tmp_path / "published" / "tiny_tune_tuned.md").read_text()
    assert (
        "`a` runs with the best of its 2 trials of `python -m benchmarks.tune` on validation "
        "classes (seeds [0], folds [0]): `tiny_tune_tuning.md`; `frozen` had no search."
    ) in table
    assert "| a |" in table and "| frozen |" in table and "| b |" not in table


def _tune_user_errors(
    tmp_path: Path,
) -> dict[str, tuple[dict[str, Any], list[str], list[str]]]:
    """Configs with a user error that tune must name before any trial."""
    typo_space = copy.deepcopy(TINY)
    typo_space["methods"]["global_pool"]["search_space"]["embedder.kwargs.gemp"] = {
        "type": "float", "low": 1.5, "high": 6.0,
    }  # fmt: skip
    typo_kwargs = copy.deepcopy(TINY)
    typo_kwargs["methods"]["global_pool"]["embedder"]["kwargs"]["embeding_size"] = 8
    return {
        "missing data root": (
            {**TINY, "dataset": {**TINY["dataset"], "root": str(tmp_path / "absent")}},
            [],
            ["dataset.root", str(tmp_path / "absent")],
        ),
        "batch larger than the classes allow": (
            {**TINY, "training": {**TINY["training"], "batch_size": 400}},
            [],
            ["training.batch_size=400", "m * (number of train classes"],
        ),
        "typo in a search-space key": (
            typo_space,
            [],
            ["global_pool: search_space key 'embedder.kwargs.gemp'", "takes no argument 'gemp'"],
        ),
        "typo in embedder kwargs": (typo_kwargs, [], ["embedder.kwargs.embeding_size"]),
        "storage without its driver": (
            TINY,
            ["--storage", "postgresql://user:secret@localhost:1/optuna"],
            ["driver is not installed", "postgresql+psycopg2://", "user:***@"],
        ),
        "storage server not there": (
            TINY,
            ["--storage", "postgresql+psycopg2://user:secret@localhost:1/optuna"],
            ["cannot connect", "Connection refused", "user:***@localhost:1"],
        ),
    }


@needs_omniglot
def test_user_errors_are_one_line_before_any_trial(tmp_path, capsys):
    for case, (data, extra, names) in _tune_user_errors(tmp_path).items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(SystemExit) as stopped:
            tune.main(
                ["--config", str(path), "--out", str(folder / "runs"), "--no-progress", *extra]
            )
        err = capsys.readouterr().err
        assert stopped.value.code == 2, case
        assert "Traceback" not in err and len(err.splitlines()) == 1, (case, err)
        assert err.startswith("benchmarks.tune: error: "), (case, err)
        assert all(name in err for name in names) and "secret" not in err, (case, err)
        assert list(folder.iterdir()) == [path], (case, "a user error left files behind")


@needs_omniglot
def test_ctrl_c_in_a_trial_is_the_resume_hint_alone(tmp_path):
    # A real process, interrupted while its first trial trains: Optuna must not log the
    # failed trial with its traceback before the command's own two lines.
    argv = ["--config", str(_config_file(tmp_path)), "--out", str(tmp_path), "--no-progress"]
    process = _start(argv, "benchmarks.tune")
    try:
        _wait_for_marker(process, tmp_path / TRIAL_FOLDERS / "trial0000" / "seed0" / "fold0", 180)
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=120)[1].decode()
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, err
    assert err.startswith("benchmarks.tune: interrupted; finished trials are kept"), err
    assert len(err.splitlines()) == 2 and "Traceback" not in err and "failed" not in err, err


def test_trials_below_the_median_are_pruned_and_not_rerun(tmp_path):
    """A stub unit whose validation curve is set by the learning rate: MedianPruner's rule."""
    space = {"optimizers.default.kwargs.lr": {"type": "float", "low": 0.0, "high": 1.0}}
    config = load_config(
        data={
            "training": {"num_epochs": 3},
            "search_space": space,
            "tune": {"trials": 6, "pruner": {"kwargs": {"n_startup_trials": 2}}},
        }
    )
    calls = []

    def stub_unit(unit_config, seed, fold, folder, on_validation):
        lr = unit_config["optimizers"]["default"]["kwargs"]["lr"]
        calls.append(folder)
        for epoch in (1, 2, 3):
            _checkpoint(folder, epoch)
            on_validation(epoch, lr * epoch)
        return {"val": {"mean_average_precision_at_r": 3 * lr}}

    storage = open_storage(str(tmp_path / "journal"))
    study = tune_method(config, "GlobalPoolEmbedder", storage, tmp_path, stub_unit, 6)
    trials = counted_trials(study, 6)
    assert len(trials) == 6 == len(calls) == len(set(calls))
    # MedianPruner: once 2 trials are complete, a trial whose value at a step is below the
    # median of the complete trials' values at that step stops there (here at epoch 1).
    complete: list[float] = []
    for trial in trials:
        lr = trial.params["optimizers.default.kwargs.lr"]
        pruned = len(complete) >= 2 and lr < statistics.median(complete)
        assert trial.state == (TrialState.PRUNED if pruned else TrialState.COMPLETE)
        unit = tmp_path / "GlobalPoolEmbedder" / f"trial{trial.number:04d}" / "seed0" / "fold0"
        assert (unit / "config.yaml").is_file()  # what the trial ran stays readable
        if pruned:
            assert trial.intermediate_values == {1: lr}
            assert _checkpoint_folders(unit) == set(), "a pruned trial kept its checkpoints"
        else:
            assert trial.intermediate_values == {1: lr, 2: 2 * lr, 3: 3 * lr}
            assert trial.value == 3 * lr
            assert _checkpoint_folders(unit) == {"models", "resume", "resume/models3"}
            complete.append(lr)
    assert len(complete) < 6, "nothing was pruned: the test checks nothing"


def _checkpoint(folder: Path, epoch: int) -> None:
    """What a unit leaves after an epoch: its config, a checkpoint and its last resume point."""
    shutil.rmtree(folder / "resume", ignore_errors=True)
    (folder / "resume" / f"models{epoch}").mkdir(parents=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "config.yaml").write_text("{}")
    (folder / "models" / f"embedder_{epoch}.pth").write_bytes(b"weights")
    (folder / "resume" / f"models{epoch}" / f"embedder_{epoch}.pth").write_bytes(b"weights")


def _checkpoint_folders(unit: Path) -> set[str]:
    """The unit's folders that hold checkpoints (``models``, ``resume`` and below)."""
    found = [p for name in ("models", "resume") for p in [unit / name, *unit.glob(f"{name}/*")]]
    return {p.relative_to(unit).as_posix() for p in found if p.is_dir()}


def test_a_diverged_trial_ends_pruned_and_counts_in_the_budget(tmp_path):
    """Training that turns NaN (an embedder's finite check, or a NaN metric) is a hopeless trial."""
    space = {"optimizers.default.kwargs.lr": {"type": "float", "low": 0.0, "high": 1.0}}
    config = load_config(
        data={"search_space": space, "tune": {"trials": 4, "pruner": {"name": "none"}}}
    )

    def stub_unit(unit_config, seed, fold, folder, on_validation):
        lr = unit_config["optimizers"]["default"]["kwargs"]["lr"]
        _checkpoint(folder, 1)
        if lr > 0.6:
            raise NonFiniteError("x contains NaN or infinite values")
        return {"val": {"mean_average_precision_at_r": float("nan") if lr > 0.3 else lr}}

    storage = open_storage(str(tmp_path / "journal"))
    study = tune_method(config, "GlobalPoolEmbedder", storage, tmp_path, stub_unit, 4)
    trials = counted_trials(study, 4)
    assert len(trials) == 4 == len(study.trials)
    for trial in trials:
        lr = trial.params["optimizers.default.kwargs.lr"]
        unit = tmp_path / "GlobalPoolEmbedder" / f"trial{trial.number:04d}" / "seed0" / "fold0"
        if lr > 0.3:
            assert trial.state == TrialState.PRUNED
            reason = "x contains NaN" if lr > 0.6 else "mean_average_precision_at_r is nan"
            assert reason in trial.user_attrs["diverged"]
            assert _checkpoint_folders(unit) == set(), "a diverged trial kept its checkpoints"
        else:
            assert trial.state == TrialState.COMPLETE and trial.value == lr
            assert _checkpoint_folders(unit) == {"models", "resume", "resume/models1"}
    assert any("diverged" in t.user_attrs for t in trials), "seed gave no diverged trial"


# --------------------------------------------------------------------------- searches


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted search, with the classes of every embedded dataset recorded."""
    out = tmp_path_factory.mktemp("uninterrupted")
    embedded: list[set[int]] = []
    original = testers.GlobalEmbeddingSpaceTester.get_all_embeddings

    def recording(self, dataset, *args, **kwargs):
        embedded.append({dataset.dataset.labels[i] for i in dataset.indices})
        return original(self, dataset, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(testers.GlobalEmbeddingSpaceTester, "get_all_embeddings", recording)
        result = tune.search(load_config(data=TINY), out, progress=False, log=lambda s: None)
    return {"out": out, "result": result, "embedded": embedded}


@needs_omniglot
def test_search_never_embeds_test_classes(reference):
    source = DataPipeline(load_config(data=TINY)["dataset"]).source
    split = mlrc_split(source.num_classes, 0, 4)
    assert reference["embedded"], "nothing was embedded"
    for classes in reference["embedded"]:
        assert classes <= set(split.val), classes  # validation only, never split.test


@needs_omniglot
def test_search_uses_its_budget_prunes_and_writes_best_yaml(reference):
    out, result = reference["out"], reference["result"]
    study = _study(out)
    counted = counted_trials(study, TRIALS)
    assert len(counted) == TRIALS == len(study.trials)
    assert {t.state for t in counted} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for trial in counted:  # every validation was reported, and each trial has its folder
        epochs = 3 if trial.state == TrialState.COMPLETE else max(trial.intermediate_values)
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
        unit = out / TRIAL_FOLDERS / f"trial{trial.number:04d}" / "seed0" / "fold0"
        assert (unit / "config.yaml").is_file() and (unit / "logs" / "logs.db").is_file()
        # A finished unit keeps its best checkpoints; a pruned one, which never runs again,
        # neither checkpoints nor a resume point.
        kept = {"models"} if trial.state == TrialState.COMPLETE else set()
        assert _checkpoint_folders(unit) == kept, trial.state
    best = best_trial(study, TRIALS)
    folder = out / TRIAL_FOLDERS / f"trial{best.number:04d}" / "seed0" / "fold0"
    unit_result = json.loads((folder / RESULTS).read_text())
    assert best.value == unit_result["val"]["mean_average_precision_at_r"]
    assert "test" not in unit_result
    tuned = load_config(result["folder"] / "best.yaml")
    method = method_config(tuned, "global_pool")
    assert (
        method["optimizers"]["default"]["kwargs"]["lr"]
        == best.params["optimizers.default.kwargs.lr"]
    )
    assert method["embedder"]["kwargs"]["pooling"] == best.params["embedder.kwargs.pooling"]
    report = (result["folder"] / "tiny_tune_tuning.md").read_text()
    lr = report.split("`optimizers.default.kwargs.lr` = `")[1].split("`")[0]
    assert lr == f"{best.params['optimizers.default.kwargs.lr']:.3g}", "not rounded for reading"
    assert (
        f"| global_pool | {TRIALS - sum(t.state == TrialState.PRUNED for t in counted)} + "
        in report
    )
    for name in ("tiny_tune_tuning_global_pool_history.png", "tiny_tune_tuning_val_curves.png"):
        assert (result["folder"] / name).is_file()


@needs_omniglot
def test_killed_search_resumes_to_the_uninterrupted_search(reference, tmp_path):
    out = tmp_path / "runs"
    argv = ["--config", str(_config_file(tmp_path)), "--out", str(out), "--no-progress"]
    process = _start(argv, "benchmarks.tune")
    # Kill the last trial that trains past epoch 1 (one the pruner does not stop at once):
    # the trials after it must be proposed as if nothing had happened.
    target = max(
        t.number for t in _study(reference["out"]).trials if len(t.intermediate_values) > 1
    )
    killed_unit = out / TRIAL_FOLDERS / f"trial{target:04d}" / "seed0" / "fold0"
    _kill_at_marker(process, killed_unit, HANG_GUARD_S)
    killed_at = _marker_epoch(killed_unit)

    tune.main(argv)  # the same command again

    study = _study(out)
    assert _trials(study) == _trials(_study(reference["out"]))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [target]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == target]
    assert len(retry) == 1 and retry[0].params == failed[0].params
    roots = {root_number(t) for t in counted_trials(study, TRIALS)}
    assert target in roots and len(roots) == TRIALS  # the retry ran in its folder, once
    folders = sorted(p.name for p in (out / TRIAL_FOLDERS).iterdir())
    assert folders == [f"trial{n:04d}" for n in sorted(roots)]
    env = json.loads((killed_unit / "env.json").read_text())
    assert [r["epoch"] for r in env["resumes"]] == [killed_at]


def _assert_workers_shared(study: optuna.Study, out: Path) -> None:
    counted = counted_trials(study, TRIALS)
    assert len(counted) == TRIALS
    for trial in study.get_trials(states=(TrialState.FAIL,)):
        assert trial.user_attrs.get("over_budget"), trial  # only trials left without budget
    pids = {t.user_attrs["pid"] for t in counted}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers ran trials
    numbers = [t.number for t in counted]
    assert len(set(numbers)) == len(numbers)
    folders = sorted(p.name for p in (out / TRIAL_FOLDERS).iterdir())
    assert folders == [f"trial{n:04d}" for n in sorted(numbers)]


@needs_omniglot
@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_workers_share_one_study(backend, tmp_path, request):
    storage = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    out = tmp_path / "runs"
    config = load_config(data={**TINY, "name": "tiny_tune"})
    tune.search(config, out, workers=2, storage=storage, progress=False, log=lambda s: None)
    _assert_workers_shared(_study(out, storage), out)


@needs_omniglot
def test_a_dead_worker_on_rdb_storage_is_found_by_optunas_heartbeat(tmp_path, request):
    # A worker on "another machine" dies (SIGKILL, and its trial is relabelled with a
    # foreign host, so that no host-and-pid check could find it): after the grace period
    # Optuna's heartbeat fails its trial and RetryHeartbeatStaleTrialCallback queues it
    # again; the next search runs the retry in the dead trial's folder, from its last epoch.
    storage = request.getfixturevalue("postgres_url")
    data = {**TINY, "name": "tiny_beat", "tune": {**TINY["tune"], "heartbeat_interval": 1}}
    path = tmp_path / "tiny_beat.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "runs"
    argv = ["--config", str(path), "--out", str(out), "--storage", storage, "--no-progress"]
    process = _start(argv, "benchmarks.tune")
    killed_unit = out / "tiny_beat" / "tune" / "global_pool" / "trial0000" / "seed0" / "fold0"
    _kill_at_marker(process, killed_unit, HANG_GUARD_S)
    opened = open_storage(storage)
    study = optuna.load_study(study_name="tiny_beat/global_pool", storage=opened)
    (dead,) = study.get_trials(states=(TrialState.RUNNING,))
    opened.set_trial_user_attr(dead._trial_id, "host", "another-machine")  # noqa: SLF001
    time.sleep(2.5)  # past the grace period, 2 x 1 s

    tune.search(load_config(path), out, storage=storage, progress=False, log=lambda s: None)

    study = optuna.load_study(study_name="tiny_beat/global_pool", storage=opened)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [dead.number]
    retries = [t for t in study.trials if root_number(t) == dead.number and t is not failed[0]]
    retries = [t for t in retries if t.number != dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(counted_trials(study, TRIALS)) == TRIALS
    env = json.loads((killed_unit / "env.json").read_text())
    assert env["resumes"], "the retry did not resume the dead trial's unit"


def test_committed_configs_search_spaces_fit_their_methods():
    configs = sorted((ROOT / "benchmarks" / "configs").glob("*.yaml"))
    tuned = 0
    for path in configs:
        config = load_config(path)
        for name in method_names(config):
            tuned += bool(search_space(method_config(config, name)))
    assert tuned >= 5  # omniglot_tune.yaml's trained heads at least


def test_best_yaml_orders_its_sections_whatever_the_hash_seed():
    """best.yaml's sections follow the search space, not a set's PYTHONHASHSEED-dependent order."""
    script = (
        "from pathlib import Path\n"
        "from benchmarks.protocol.config import load_config\n"
        "from benchmarks.search.best_config import best_config\n"
        "config = load_config(Path('benchmarks/configs/cub224_tune.yaml'))\n"
        "best = {'crt': {'optimizers.default.kwargs.lr': 1e-4, 'loss.kwargs.alpha': 2.0,\n"
        "                'miner.kwargs.epsilon': 0.1, 'embedder.kwargs.temperature': 0.1}}\n"
        "print(list(best_config(config, best, ['crt'], 3)['methods']['crt']))\n"
    )
    orders = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(6)
    }
    assert orders == {"['embedder', 'optimizers', 'loss', 'miner']\n"}
