"""The ledger of published numbers: every README number from a run cites a claim whose ledger
re-derives from the stored results, and a README number or ledger value that disagrees is
caught and named."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from toymesa import claims

SHIPPED = sorted(p.parent for p in (claims.ROOT / "experiments").glob("*/results/claims.json"))


def test_every_readme_number_cites_its_ledger():
    problems = claims.check_docs()
    assert not problems, "\n".join(problems[:40])


SLOW = {"persistence_cot": "its ledger reruns the CI-coverage simulation (1,000 trials x 6 settings, ~15 s)"}


@pytest.mark.parametrize(
    "out", [pytest.param(p, marks=pytest.mark.slow) if p.parent.name in SLOW else p for p in SHIPPED], ids=[p.parent.name for p in SHIPPED]
)
def test_each_shipped_ledger_re_derives_from_its_stored_results(out):
    stored = json.loads((out / claims.LEDGER).read_text())
    assert claims.differences(stored, claims.derive(out)) == []


def test_every_ledger_a_readme_cites_exists_and_names_its_run():
    names = {m.group(1) for d in claims.DOCS for m in claims.MARK.finditer((claims.ROOT / d).read_text())}
    assert names, "the READMEs cite no ledger"
    for n in names:
        ledger = json.loads(claims.ledger_path(n).read_text())
        assert ledger["ledger"] == n and ledger["run"] and ledger["command"] and ledger["claims"]


def _root_with(tmp_path, ledger: dict, text: str):
    """A repository root holding one ledger (docs/claims/x.json) and one README."""
    (tmp_path / "docs" / "claims").mkdir(parents=True)
    (tmp_path / "docs" / "claims" / "x.json").write_text(json.dumps(ledger))
    (tmp_path / "README.md").write_text(text)
    return tmp_path


LEDGER = {
    "ledger": "x",
    "run": "results/x",
    "command": "toymesa run x",
    "claims": {
        "gap": {"text": "+0.703 [+0.607, +0.798]", "value": 0.703, "lo": 0.607, "hi": 0.798},
        "kept": {"text": "61.9% [55.0, 70.1]", "value": 0.619, "lo": 0.55, "hi": 0.701},
        "table": {"text": "| a | b |\n|---|---|\n| 1 | 2 |"},
    },
}
README = (
    "The gap is <!--c x/gap-->+0.703 [+0.607, +0.798]<!--/c-->; kept <!--c x/kept pct-->61.9%<!--/c--> "
    + "(<!--c x/kept pct0-->62%<!--/c-->).\n\n<!--c x/table-->\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<!--/c-->\n"
    + "```\n12.5% in a code block is output, not a claim\n<!--c x/gap-->an example<!--/c-->\n```\n"
    + "Cite with `<!--c x/kept-->...<!--/c-->`: a marker in code is an example, not a citation.\n"
)


def test_a_tampered_readme_number_is_named_with_both_values(tmp_path):
    root = _root_with(tmp_path, LEDGER, README)
    assert claims.check_docs(root, ["README.md"]) == []
    (root / "README.md").write_text(README.replace("62%", "64%"))
    assert claims.check_docs(root, ["README.md"]) == ["README.md:1: x/kept: README says '64%', ledger says '62%'"]
    (root / "README.md").write_text(README.replace("| 1 | 2 |\n\n", "| 1 | 3 |\n\n"))
    assert claims.check_docs(root, ["README.md"])[0].startswith("README.md:3: x/table: README says ")


def test_a_tampered_ledger_value_is_caught(tmp_path):
    changed = json.loads(json.dumps(LEDGER))
    changed["claims"]["gap"]["text"] = "+0.702 [+0.607, +0.798]"
    root = _root_with(tmp_path, changed, README)
    assert claims.check_docs(root, ["README.md"]) == ["README.md:1: x/gap: README says '+0.703 [+0.607, +0.798]', ledger says '+0.702 [+0.607, +0.798]'"]
    assert claims.differences(LEDGER, changed) == ["gap: '+0.703 [+0.607, +0.798]' stored, '+0.702 [+0.607, +0.798]' re-derived"]


def test_unknown_claims_and_uncited_results_are_reported(tmp_path):
    text = "a <!--c x/nope-->1<!--/c--> b <!--c y/gap-->2<!--/c--> c 55% d [0.1, 0.2] `7.5%` <!--x test tolerance-->5%<!--/x--> <!--x -->6%<!--/x-->\n"
    root = _root_with(tmp_path, LEDGER, text)
    problems = claims.check_docs(root, ["README.md"])
    assert problems[0] == "README.md:1: x/nope: no such claim in docs/claims/x.json"
    assert problems[1].startswith("README.md:1: ledger 'y' not found")
    assert problems[2] == "README.md:1: <!--x--> needs a reason: where the number comes from, if not a run"
    assert [p.split("'")[1] for p in problems[3:]] == ["55%", "[0.1, 0.2]"]  # inline code and numbers marked as not a run's are exempt


def test_fill_rewrites_cited_numbers_from_the_ledger_and_nothing_else(tmp_path):
    stale = README.replace("62%", "64%").replace("| 1 | 2 |\n\n", "| 1 | 3 |\n\n")
    root = _root_with(tmp_path, LEDGER, stale)
    assert claims.fill_docs(root, ["README.md"]) == ["README.md"]
    assert (root / "README.md").read_text() == README
    assert claims.fill_docs(root, ["README.md"]) == []  # idempotent


def test_formats_render_value_and_ci():
    assert claims.fmt(0.619, 0.55, 0.701, "pctci") == "61.9% [55.0, 70.1]"
    assert claims.fmt(0.703, 0.607, 0.798) == "+0.703 [+0.607, +0.798]"
    assert claims.fmt(12.345, spec="{v:.1f} s") == "12.3 s"
    c = claims.number(0.5, 0.25, 0.75, "pctci0")
    assert (c.text, c.value, c.lo, c.hi) == ("50% [25, 75]", 0.5, 0.25, 0.75)


def test_a_run_ledger_is_derived_from_stored_results_and_checked(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    ledger = claims.derive(out)  # no claims.py: the verdicts and the summary table
    assert ledger["ledger"] == "tinyrun" and ledger["code_digest"] == json.loads((out / "meta.json").read_text())["code_digest"]
    assert ledger["claims"]["H1.verdict"]["text"] == pd.read_csv(out / "verdicts.csv")["verdict"][0]
    summary = pd.read_csv(out / "summary.csv")
    c = ledger["claims"]["cell.1.helpful_accuracy"]
    assert (c["value"], c["lo"], c["hi"]) == tuple(summary.loc[1, ["helpful_accuracy", "helpful_accuracy_lo", "helpful_accuracy_hi"]])
    summary.loc[1, "helpful_accuracy"] = 0.123
    summary.to_csv(out / "summary.csv", index=False)
    assert claims.differences(ledger, claims.derive(out)) == [
        f"cell.1.helpful_accuracy: {c['text']!r} stored, '12.3% [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]' re-derived"
    ]


def test_a_marker_that_opens_a_paragraph_line_is_reported(tmp_path):
    text = "Kept\n<!--c x/kept pct-->61.9%<!--/c--> of it.\n\n<!--c x/table-->\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<!--/c-->\n```\nx\n<!-- in code -->\n```\n"
    root = _root_with(tmp_path, LEDGER, text)
    assert claims.check_docs(root, ["README.md"]) == [
        "README.md:2: a marker opens a line inside a paragraph (markdown would end the paragraph there); move it after a word"
    ]
