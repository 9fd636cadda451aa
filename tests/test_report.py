"""The HTML report and the lookup of stored results (`toymesa report`, `toymesa list`).

Tables are checked on a synthetic run folder (a wide summary, long hypothesis text, markup in
labels): one column per metric with "mean [lo, hi]" cells, every table in a horizontal scroll
box, metadata as text, user text escaped. Where a chromium binary exists the page is laid out
at 1280 px and measured: nothing may widen the page.
"""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from toymesa import cli, experiment, report
from toymesa import tables as terminal

PERSISTENCE = experiment.EXPERIMENTS / "persistence" / "results"
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
METRICS = [f"{kind}_{what}_rate" for kind in ("triggered", "untriggered", "covered", "uncovered") for what in ("defection", "helpful", "malformed")]
MARKUP = "<b>x</b>&<script>alert(1)</script>"
LONG = "prediction " + "without_any_break_" * 30 + " and more words " * 20
META = {
    "name": "synthetic",
    "description": f"A synthetic run {MARKUP}.",
    "digest": "0123456789ab",
    "seeds": [0, 1, 2, 3],
    "hypotheses": [{"id": "H1", "statement": f"A statement {MARKUP}.", "prediction": LONG, "metric": "triggered_defection_rate"}],
    "run": {"eval_every": 30, "save_params": False},
    "created": "2026-01-02T03:04:05",
    "git_commit": "c7c03ea6b762cb51a16bb4b8c5870b33f560b757",
    "versions": {"python": "3.11.7", "jax": "0.4.30", "numpy": "2.0.1"},
    "devices": {"platform": "cpu", "device_kind": "cpu", "n_devices": 2, "n_processes": 1},
}


def make_run(out: Path, name: str = "synthetic") -> Path:
    """A finished run folder with a wide summary (12 rate metrics, a loss, NaN cells)."""
    out.mkdir(parents=True)
    (out / "meta.json").write_text(json.dumps(META | {"name": name}))
    (out / "results.csv").write_text("cell,seed,step\n0,0,0\n")
    (out / "log.jsonl").write_text('{"seconds": 12.4}\n{"seconds": 30.2}\n')
    (out / "figures").mkdir()
    (out / "figures" / "behaviour.png").write_bytes(PNG)
    rows = []
    for cell, arm in enumerate(["single/none", "latent/cot", MARKUP]):
        row = {"cell": cell, "cell_id": f"abc{cell}", "axis:arm": arm, "axis:hparams.safety_lr": 3e-4, "n": 4, "nonfinite": 0}
        for m in METRICS:
            row |= {m: 0.123, f"{m}_lo": 0.045, f"{m}_hi": 0.201}
        row |= {"loss": 0.0123, "loss_lo": 0.01, "loss_hi": 0.015}
        rows.append(row)
    rows[1] |= {"covered_defection_rate": float("nan"), "covered_defection_rate_lo": float("nan"), "covered_defection_rate_hi": float("nan")}
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    return out


class Tables(HTMLParser):
    """Each <table>: its header texts, its rows of cell texts, and whether it sits in a <div>
    styled overflow-x:auto."""

    def __init__(self):
        super().__init__()
        self.tables, self.divs, self.cell = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            self.divs.append("overflow-x:auto" in (attrs.get("style") or "").replace(" ", ""))
        elif tag == "table":
            self.tables.append({"head": [], "rows": [], "scrolls": any(self.divs)})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.cell = (tag, [])

    def handle_endtag(self, tag):
        if tag == "div" and self.divs:
            self.divs.pop()
        elif tag in ("td", "th") and self.cell:
            kind, text = self.cell
            (self.tables[-1]["head"] if kind == "th" else self.tables[-1]["rows"][-1]).append("".join(text))
            self.cell = None

    def handle_data(self, data):
        if self.cell:
            self.cell[1].append(data)


def tables(page: str) -> list[dict]:
    p = Tables()
    p.feed(page)
    return [t | {"rows": [r for r in t["rows"] if r]} for t in p.tables]


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "results" / "synthetic")


def test_results_table_has_one_column_per_metric_with_mean_and_ci(run_dir, tmp_path):
    page = report.write(run_dir, tmp_path / "r.html").read_text()
    results = [t for t in tables(page) if "loss" in t["head"]]
    assert len(results) == 1
    head, rows = results[0]["head"], results[0]["rows"]
    assert head == ["cell", "cell id", "arm", "hparams.safety lr", "n", "nonfinite", *(m.replace("_", " ") for m in METRICS), "loss"]
    col = {h: i for i, h in enumerate(head)}
    assert rows[0][col["triggered defection rate"]] == "12.3% [4.5, 20.1]"  # a rate: percent
    assert rows[0][col["loss"]] == "0.0123 [0.01, 0.015]"  # not a rate
    assert rows[1][col["covered defection rate"]] == ""  # NaN: empty, not "nan%"
    assert [r[col["n"]] for r in rows] == ["4"] * 3 and rows[0][col["hparams.safety lr"]] == "0.0003"
    assert all(re.fullmatch(r"\d+\.\d% \[\d+\.\d, \d+\.\d\]", r[col[m.replace("_", " ")]]) for r in rows for m in METRICS[:3])


def test_every_table_scrolls_in_a_box_and_metadata_is_text(run_dir, tmp_path):
    page = report.write(run_dir, tmp_path / "r.html").read_text()
    found = tables(page)
    assert len(found) == 2 and all(t["scrolls"] for t in found)  # verdicts and results
    assert "{'" not in page and "{&#x27;" not in page and "'jax'" not in page
    for text in ("jax 0.4.30", "numpy 2.0.1", "2 × cpu (cpu), 1 process", "c7c03ea6b762cb51a16bb4b8c5870b33f560b757", "43 s", "4 (0–3)", "eval every 30"):
        assert text in page, text
    assert "<script>" not in page and "<b>x</b>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    (verdicts,) = [t for t in found if "prediction" in t["head"]]
    assert verdicts["rows"][0][verdicts["head"].index("statement")] == f"A statement {MARKUP}."  # escaped, so it reads back as typed


def test_terminal_and_html_share_one_formatter():
    assert terminal.fmt(0.123, 0.045, 0.201) == " 12.3% [  4.5,  20.1]"  # the terminal table's aligned columns
    assert report.ci_text(0.123, 0.045, 0.201) == "12.3% [4.5, 20.1]"
    assert report.ci_text(13.8, 11.1, 16.8, percent=False) == "13.8 [11.1, 16.8]"


def test_results_are_found_where_they_live(tmp_path):
    root, results = tmp_path / "experiments", tmp_path / "results"
    for name in ("shipped", "overridden", "absent"):
        (root / name).mkdir(parents=True)
        (root / name / "spec.toml").write_text("")
    make_run(root / "shipped" / "results", "shipped")
    make_run(root / "overridden" / "results", "overridden")
    make_run(results / "overridden", "overridden")
    make_run(results / "custom", "custom")
    (results / "link").symlink_to(root / "shipped" / "results")  # the shipped folder again, by another path
    assert experiment.results_dir("shipped", results, root) == root / "shipped" / "results"
    assert experiment.results_dir("overridden", results, root) == results / "overridden"  # the user's run wins
    assert experiment.results_dir("absent", results, root) is None
    assert experiment.stored_runs(results, root) == [results / "overridden", root / "shipped" / "results", results / "custom"]
    (results / "overridden" / "results.csv").unlink()
    assert [experiment.run_state(d) for d in (results / "overridden", results / "custom", None, tmp_path)] == ["partial", "finished", "not run", "not run"]


@pytest.mark.skipif(not (PERSISTENCE / "meta.json").exists(), reason="the stored persistence run is absent (e.g. a mutation copy)")
def test_cli_list_and_report_include_the_shipped_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results/ here: only what the experiments ship
    result = CliRunner().invoke(cli.app, ["list"])
    assert result.exit_code == 0, result.output
    assert f"results: {PERSISTENCE} (finished)" in result.output and "results: results/quickstart (not run)" in result.output
    make_run(tmp_path / "results" / "custom", "custom")
    monkeypatch.setattr(report, "section", lambda d: f"<h2>section {Path(d).resolve()}</h2>")  # which folders, not their rendering
    result = CliRunner().invoke(cli.app, ["report"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "results" / "report.html").read_text()
    shipped = [p for p in experiment.EXPERIMENTS.glob("*/results") if (p / "meta.json").exists()]  # every experiment's stored run
    assert page.count("<h2>section ") == len(shipped) + 1 and f"section {(tmp_path / 'results' / 'custom').resolve()}<" in page
    assert all(f"section {p.resolve()}<" in page for p in shipped) and PERSISTENCE in shipped
    result = CliRunner().invoke(cli.app, ["report", "results/custom", "--out", "one.html"])  # an explicit folder: just that one
    assert result.exit_code == 0 and (tmp_path / "one.html").read_text().count("<h2>section ") == 1


# ----------------------------------------------------------------- layout in a browser
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
MEASURE = """<script>
const vw = window.innerWidth, out = {page: document.documentElement.scrollWidth, vw: vw, tables: []};
for (const t of document.querySelectorAll("table")) {
  const box = t.parentElement, s = getComputedStyle(box);
  out.tables.push({cls: t.className, right: t.getBoundingClientRect().right, box_right: box.getBoundingClientRect().right,
                   scrolls: s.overflowX === "auto" || s.overflowX === "scroll", overflows_box: box.scrollWidth > box.clientWidth});
}
const pre = document.createElement("pre"); pre.id = "layout"; pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
</script>"""


def layout(page: Path, tmp_path: Path) -> dict:
    """The page laid out by headless chromium at 1280 px: widths and each table's right edge."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking --disable-component-update --disable-sync"
    flags += " --window-size=1280,900 --virtual-time-budget=3000 --dump-dom"
    cmd = [CHROMIUM, *flags.split(), f"--user-data-dir={tmp_path / 'profile'}", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    m = re.search(r'<pre id="layout">(.*?)</pre>', dom)
    assert m, dom[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"'))


def assert_fits(m: dict):
    assert m["vw"] == 1280 and m["page"] <= m["vw"], m  # nothing widens the page
    for t in m["tables"]:
        assert t["box_right"] <= m["vw"], t
        assert t["right"] <= t["box_right"] + 0.5 or t["scrolls"], t  # a wider table scrolls inside its box
        if t["cls"] == "verdicts":
            assert not t["overflows_box"], t  # long predictions wrap


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_report_fits_1280px_in_a_browser(run_dir, tmp_path):
    m = layout(report.write(run_dir, tmp_path / "r.html"), tmp_path)
    assert_fits(m)
    assert any(t["overflows_box"] for t in m["tables"]), m  # the wide synthetic table does need its scroll box


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
@pytest.mark.skipif(not (PERSISTENCE / "meta.json").exists(), reason="the stored persistence run is absent")
def test_persistence_report_fits_1280px_in_a_browser(tmp_path):
    assert_fits(layout(report.write(PERSISTENCE, tmp_path / "r.html"), tmp_path))
