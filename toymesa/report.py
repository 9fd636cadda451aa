"""One self-contained HTML page from stored results: per experiment its description,
hypotheses with verdicts, headline table, figures (embedded) and run metadata. Reads
only what runs wrote; never trains."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from toymesa import experiment, store

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}.meta{font-size:12px;color:#555}
.confirmed{color:#1a7f37;font-weight:bold}.refuted{color:#c62828;font-weight:bold}.inconclusive{color:#9a6700}"""


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="", border=0)


def _verdicts(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><i>No hypotheses were stated for this run.</i></p>"
    df = df.copy()
    df["verdict"] = [f'<span class="{html.escape(str(v).split()[0])}">{html.escape(str(v))}</span>' for v in df["verdict"]]
    return df.to_html(index=False, escape=False, border=0, na_rep="")


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def section(out: Path, redraw: bool = False) -> str:
    """The HTML of one run folder."""
    exp = experiment.for_results(out)
    meta = json.loads((out / "meta.json").read_text())
    complete = (out / "results.csv").exists()
    parts = [f"<h2>{html.escape(meta['name'])}</h2>", f"<p>{html.escape(meta.get('description', ''))}</p>"]
    if not complete:
        parts.append(f"<p><b>Incomplete run</b>: {len(list((out / 'chunks').glob('*.npz')))} chunks finished; rerun the same command to finish it.</p>")
    else:
        pngs = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() and not redraw else []
        if not pngs:
            pngs = [p for p in exp.figures(out) if p.suffix == ".png"]
        parts += ["<h3>Hypotheses and verdicts</h3>", _verdicts(exp.verdicts(out))]
        parts += ["<h3>Results (mean [95% bootstrap CI] over seeds)</h3>", _table(exp.table(out))]
        parts += ["<h3>Figures</h3>", *(_image(p) for p in pngs)]
    log = out / "log.jsonl"
    seconds = sum(json.loads(line)["seconds"] for line in log.read_text().splitlines()) if log.exists() else float("nan")
    parts.append(
        '<p class="meta">'
        + html.escape(
            f"folder {out} · created {meta.get('created')} · git {meta.get('git_commit')} · devices {meta.get('devices')} · "
            f"compute {seconds:.0f}s · seeds {len(meta.get('seeds', []))} · versions {meta.get('versions')}"
        )
        + "</p>"
    )
    return "\n".join(parts)


def write(results: Path, dest: Path | None = None) -> Path:
    """Write the report of every run folder under `results` to `dest` (default results/report.html)."""
    results = Path(results)
    dirs = experiment.result_dirs(results)
    if not dirs:
        raise FileNotFoundError(f"no run folders (with meta.json) under {results}; run `toymesa demo` or `toymesa run NAME` first")
    dest = results / "report.html" if dest is None else Path(dest)
    body = "\n<hr>\n".join(section(d) for d in dirs)
    head = f"<head><meta charset='utf-8'><title>toymesa report</title><style>{CSS}</style></head>"
    page = f"<!doctype html><html>{head}<body><h1>toymesa report</h1>{body}</body></html>"
    return store.save_text(page, dest)
