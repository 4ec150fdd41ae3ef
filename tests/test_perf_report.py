"""``benchmarks.perf.report``: the machine table names the results measured on each machine."""

from __future__ import annotations

from benchmarks.perf.report import MACHINE_FIELDS, machine_rows, machine_section


def _run(cpu: str) -> dict:
    machine = {field: f"{field}-value" for _, field in MACHINE_FIELDS}
    machine.update(
        cpu_model=cpu,
        torch_threads=1,
        started="2026-12-06 19:33:40 UTC",
        load_average_start=[0.1, 0.2, 0.3],
        load_average_end=[1.0, 1.1, 1.2],
    )
    return {"machine": machine, "command": "python -m x", "elapsed_s": 10.0}


def test_one_machine_row_per_distinct_machine_naming_its_results() -> None:
    runs = {"head_cost": _run("Xeon"), "compile": _run("EPYC"), "step_time": _run("EPYC")}
    rows = machine_rows(runs)
    assert [row[:2] for row in rows] == [["head_cost", "Xeon"], ["compile, step_time", "EPYC"]]
    assert all(len(row) == len(MACHINE_FIELDS) + 1 for row in rows)


def test_machine_section_lists_every_machine_and_every_run() -> None:
    text = machine_section({"head_cost": _run("Xeon"), "compile": _run("EPYC")})
    assert "| head_cost | Xeon |" in text
    assert "| compile | EPYC |" in text
    assert text.count("`python -m x`") == 2
