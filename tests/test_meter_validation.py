"""The LLC validation table (theory/meter.md): every case within 10% of the closed form with
one frozen setting and the automatic step size. Two cases rerun in every test run; all of them
under `make test-slow`; the table in theory/meter.md must match the stored measurement."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from toymesa.meter import closed_forms

THEORY = Path(__file__).resolve().parents[1] / "theory"


def _validation():
    spec = importlib.util.spec_from_file_location("meter_validation", THEORY / "meter_validation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


V = _validation()
STORED = json.loads((THEORY / "meter_validation.json").read_text())


def test_stored_table_covers_the_required_cases_within_tolerance():
    cases = STORED["cases"]
    rrr = [c for c in cases if c["L"] == 2]
    deep = [c for c in cases if c["L"] >= 3]
    assert len(rrr) >= 6 and len(deep) >= 3
    assert any(c["r"] == 0 for c in rrr)
    # a case outside the first regime of the reduced-rank-regression formula
    assert any(not (N + r <= M + H and M + r <= N + H and H + r <= M + N) for (M, H, N), r in ((c["widths"], c["r"]) for c in rrr))
    for c in cases:
        assert c["lambda"] == closed_forms.dln(c["widths"], c["r"])  # the true value is the closed form's
        assert abs(c["estimate"] / c["lambda"] - 1) < V.TOLERANCE, c
        assert c["divergent"] == 0
    assert STORED["setting"]["step"] is None  # automatic step size
    assert {k: STORED["setting"][k] for k in V.SETTING._fields} == V.SETTING._asdict()  # the frozen setting is the one stored
    assert [(tuple(c["widths"]), c["r"]) for c in cases] == [(tuple(w), r) for w, r in V.CASES]


def test_theory_note_shows_the_stored_table():
    note = (THEORY / "meter.md").read_text()
    table = V.table(STORED["cases"])
    assert table in note, "theory/meter.md's validation table differs from theory/meter_validation.json; paste the output of theory/meter_validation.py"
    assert re.search(rf"{STORED['setting']['draws']:,} draws", note)


@pytest.mark.slow  # the stored table is checked in make test; rerunning cases is statistical work
@pytest.mark.parametrize(("widths", "r"), [((2, 2, 8), 1), ((4, 3, 3, 4), 1)])
def test_a_validation_case_reruns_within_tolerance(widths, r):
    row = V.measure(widths, r)
    assert abs(row["rel_error"]) < V.TOLERANCE, row


@pytest.mark.slow
@pytest.mark.parametrize(("widths", "r"), V.CASES)
def test_every_validation_case_within_tolerance(widths, r):
    row = V.measure(widths, r)
    assert abs(row["rel_error"]) < V.TOLERANCE, row
