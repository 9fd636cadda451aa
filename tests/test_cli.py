"""The command line's own behaviour: help without JAX, CPU device counts."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["demo", "run", "sweep", "figures", "report", "list", "bench", "show"]


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", COMMANDS)
def test_help_does_not_import_jax(command):
    """--help answers at once: nothing on its path imports JAX (seconds) or the model code."""
    code = (
        "import sys; from typer.testing import CliRunner; from toymesa import cli\n"
        f"r = CliRunner().invoke(cli.app, [{command!r}, '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"`toymesa {command} --help` imported {proc.stdout.strip()}"


@pytest.mark.parametrize("given,expect", [(3, 3), (None, None)])
def test_cpu_devices_reach_jax_imported_later(given, expect):
    """The --cpu-devices count set before JAX is imported is the count JAX starts with."""
    code = f"import os; from toymesa import cli; cli._cpu_devices({given}); import jax; print(jax.device_count(), os.cpu_count())"
    proc = _python(code, env={"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    count, cores = map(int, proc.stdout.split())
    assert count == (expect or cores)


def test_cpu_devices_after_jax_ran_keeps_its_devices():
    code = "import jax; jax.numpy.zeros(1); n = jax.device_count(); from toymesa import cli; cli._cpu_devices(5); print(jax.device_count() == n)"
    proc = _python(code, env={"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr


def _summary(n_metrics: int):
    import pandas as pd

    rows = []
    for arm, mean in [("single/none", 1.0), ("latent/cot", 0.448)]:
        row = {"arm": arm, "nonfinite": 0}
        for k in range(n_metrics):
            row |= {f"metric_{k}": mean, f"metric_{k}_lo": mean / 2, f"metric_{k}_hi": min(1.0, mean * 1.5)}
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("width,n_metrics", [(100, 6), (100, 2), (80, 9), (200, 9)])
def test_terminal_table_keeps_each_ci_on_one_line(width, n_metrics):
    """At any console width every "mean [lo, hi]" cell is printed whole on one line, and no
    line is wider than the console: columns that do not fit go to a continued table."""
    import io

    from rich.console import Console

    from toymesa import tables

    console = Console(width=width, record=True, markup=False, highlight=False, file=io.StringIO())
    summary = _summary(n_metrics)
    metrics = [f"metric_{k}" for k in range(n_metrics)]
    tables.print_table(console, "title", summary, "arm", metrics)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    for _, r in summary.iterrows():
        for m in metrics:
            cell = tables.fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"])
            assert any(cell in line for line in lines), (cell, text)
    for m in metrics:  # every metric shown once, in some table
        assert text.count(m.replace("_", " ")) == 1
    assert text.count("single/none") == len(tables.column_groups([22] * n_metrics, 4 + len("single/none"), width))


def test_column_groups_pack_greedily():
    from toymesa import tables

    assert tables.column_groups([10, 10, 10], fixed=20, room=58) == [[0, 1], [2]]  # 20 + 13 + 13 = 46; a third: 59 > 58
    assert tables.column_groups([10, 10, 10], fixed=20, room=59) == [[0, 1, 2]]
    assert tables.column_groups([100, 5], fixed=20, room=60) == [[0], [1]]  # too wide alone: its own group
    assert tables.column_groups([], fixed=20, room=60) == [[]]
