"""One self-contained HTML page from stored results: per experiment its description,
hypotheses with verdicts, headline table, figures (embedded) and run metadata. Reads
only what runs wrote; never trains.

Tables: a metric is any column ``m`` with companions ``m_lo`` and ``m_hi`` (the 95% CI of
`toymesa.stats.summarize`); it is shown as one column of "mean [lo, hi]" cells (`ci_text`),
in percent when it is a rate. Every table sits in a horizontal scroll box, so a wide one never
widens the page. All text from results (labels, hypotheses, metadata) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import pandas as pd

from toymesa import experiment, store, verify
from toymesa.stats import is_rate, metrics

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
th{background:#f3f3f3;text-align:center}td{text-align:right}td.text{text-align:left}td.ci{white-space:nowrap}
table.verdicts td{text-align:left;overflow-wrap:anywhere}table.verdicts td.word{overflow-wrap:normal}
img{max-width:100%;margin:.5em 0}.desc{white-space:pre-wrap}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:1px 1em;font-size:12px;color:#555}
dl.meta dt{font-weight:bold}dl.meta dd{margin:0;overflow-wrap:anywhere}
.confirmed{color:#1a7f37;font-weight:bold}.refuted{color:#c62828;font-weight:bold}.inconclusive{color:#9a6700}"""

WORDS = frozenset({"id", "verdict", "registration", "analysis"})  # verdict columns broken only between words


def ci_text(mean: float, lo: float, hi: float, percent: bool = True, width: int = 0) -> str:
    """A mean and its CI as "mean [lo, hi]": "12.3% [4.5, 20.1]" for a rate (`percent`),
    else 3 significant digits; `width` pads each number (aligned terminal columns)."""
    if percent:
        return f"{100 * mean:{width}.1f}% [{100 * lo:{width}.1f}, {100 * hi:{width}.1f}]"
    return f"{mean:{width}.3g} [{lo:{width}.3g}, {hi:{width}.3g}]"


def _header(col) -> str:
    return html.escape(str(col).removeprefix("axis:").replace("_", " "))


def _value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table from escaped header texts and cell HTML, in a horizontal scroll box."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_i) + "</tr>" for rows_i in rows)
    attr = f' class="{cls}"' if cls else ""
    return f'<div class="scroll" style="overflow-x:auto"><table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def table_html(df: pd.DataFrame) -> str:
    """A results table with one column per metric ("mean [lo, hi]" cells, percent for rates);
    other columns (labels, n, nonfinite) as they are."""
    ms = metrics(df)
    bounds = {f"{m}_{b}" for m in ms for b in ("lo", "hi")}
    cols = [c for c in df.columns if c not in bounds]
    rate = {m: is_rate(df, m) for m in ms}
    rows = []
    for r in df.to_dict("records"):
        cells = []
        for c in cols:
            if c in rate:
                mean, lo, hi = (r[c], r[f"{c}_lo"], r[f"{c}_hi"])
                if pd.isna(mean):
                    cells.append("<td></td>")
                    continue
                text = ci_text(mean, lo, hi, rate[c])
                cells.append(f'<td class="ci">{html.escape(text)}</td>')
            else:
                v = r[c]
                cls = ' class="text"' if isinstance(v, str) else ""
                cells.append(f"<td{cls}>{html.escape(_value(v))}</td>")
        rows.append(cells)
    return _html_table([_header(c) for c in cols], rows)


def verdicts_html(df: pd.DataFrame) -> str:
    """The hypotheses table; its long texts wrap inside the page width."""
    if df.empty:
        return "<p><i>No hypotheses were stated for this run.</i></p>"
    rows = []
    for r in df.to_dict("records"):
        cells = []
        for c in df.columns:
            text = html.escape(_value(r[c]))
            if c == "verdict":  # "refuted [EDITED AFTER RESULTS]" is styled as refuted
                text = f'<span class="{html.escape(text.partition(" ")[0])}">{text}</span>'
            cells.append(f'<td class="word">{text}</td>' if c in WORDS else f"<td>{text}</td>")
        rows.append(cells)
    return _html_table([_header(c) for c in df.columns], rows, "verdicts")


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _pairs(d: dict) -> str:
    """{"jax": "0.4"} -> "jax 0.4 · ..."."""
    return " · ".join(f"{str(k).replace('_', ' ')} {v}" for k, v in d.items() if v is not None)


def _devices(d) -> str:
    if isinstance(d, dict) and {"n_devices", "device_kind", "platform"} <= d.keys():
        procs = d.get("n_processes", 1)
        return f"{d['n_devices']} × {d['device_kind']} ({d['platform']}), {procs} process{'es' if procs != 1 else ''}"
    return _pairs(d) if isinstance(d, dict) else str(d)


def _seeds(seeds: list) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{len(seeds)} ({seeds[0]}–{seeds[-1]})"
    shown = ", ".join(map(str, seeds[:12]))
    return f"{len(seeds)} ({shown}{', …' if len(seeds) > 12 else ''})"


def meta_html(out: Path, meta: dict) -> str:
    """Run metadata as a definition list: folder, created, git commit, devices, compute
    seconds (from log.jsonl), seeds, run settings, digests, whether and when `toymesa verify`
    recomputed it (RUN/verified.json), machine type, library versions."""
    log = out / "log.jsonl"
    seconds = sum(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip()) if log.exists() else None
    items = {
        "folder": str(out),
        "created": meta.get("created"),
        "git commit": meta.get("git_commit"),
        "host": meta.get("host"),
        "devices": _devices(meta["devices"]) if meta.get("devices") is not None else None,
        "compute": f"{seconds:,.0f} s" if seconds is not None else None,
        "seeds": _seeds(list(meta["seeds"])) if meta.get("seeds") is not None else None,
        "run settings": _pairs(meta["run"]) if isinstance(meta.get("run"), dict) else None,
        "spec digest": meta.get("digest"),
        "code digest": meta.get("code_digest") or "not recorded",
        "verification": verify.status(out),
        "machine": _pairs(meta["machine"]) if isinstance(meta.get("machine"), dict) else None,
        "versions": _pairs(meta["versions"]) if isinstance(meta.get("versions"), dict) else None,
    }
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items() if v is not None)
    return f'<dl class="meta">{rows}</dl>'


def section(out: Path, redraw: bool = False) -> str:
    """The HTML of one run folder."""
    out = Path(out)
    exp = experiment.for_results(out)
    meta = json.loads((out / "meta.json").read_text())
    complete = (out / "results.csv").exists()
    parts = [f"<h2>{html.escape(meta['name'])}</h2>", f'<p class="desc">{html.escape(meta.get("description", "").strip())}</p>']
    if not complete:
        parts.append(f"<p><b>Incomplete run</b>: {len(list((out / 'chunks').glob('*.npz')))} chunks finished; rerun the same command to finish it.</p>")
    else:
        pngs = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() and not redraw else []
        if not pngs:
            pngs = [p for p in exp.figures(out) if p.suffix == ".png"]
        parts += ["<h3>Hypotheses and verdicts</h3>", verdicts_html(exp.verdicts(out))]
        parts += ["<h3>Results (mean [95% bootstrap CI] over seeds; rates in %)</h3>", table_html(exp.table(out))]
        parts += ["<h3>Figures</h3>", *(_image(p) for p in pngs)]
    parts += ["<h3>Run</h3>", meta_html(out, meta)]
    return "\n".join(parts)


def write(results: Path | list[Path], dest: Path | None = None) -> Path:
    """Write the report of every run folder under `results` (or of each folder of a list) to
    `dest` (default `results`/report.html; required with a list)."""
    if isinstance(results, list):
        dirs = results
        if not dirs:
            raise FileNotFoundError("no stored results found (see `toymesa list`); run `toymesa demo` or `toymesa run NAME` first")
    else:
        results = Path(results)
        dirs = experiment.result_dirs(results)
        if not dirs:
            raise FileNotFoundError(f"no run folders (with meta.json) under {results}; run `toymesa demo` or `toymesa run NAME` first")
        dest = results / "report.html" if dest is None else dest
    if dest is None:
        raise ValueError("write: pass dest with a list of run folders")
    body = "\n<hr>\n".join(section(d) for d in dirs)
    head = f"<head><meta charset='utf-8'><meta name='viewport' content='width=device-width'><title>toymesa report</title><style>{CSS}</style></head>"
    page = f"<!doctype html><html>{head}<body><h1>toymesa report</h1>{body}</body></html>"
    return store.save_text(page, Path(dest))
