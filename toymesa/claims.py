"""The ledger of published numbers: every number a README reports from a run, with its source.

A ledger is a ``claims.json`` in a run folder, derived from the stored results only (never by
training): claim id -> value, CI, and the text a README prints, plus the run folder, the
command that produced the run, and the run's code and spec digests. An experiment states its
claims in ``experiments/NAME/claims.py`` (``claims(out) -> dict[str, Claim]``; kept apart from
``analysis.py``, whose digest the preregistration record guards: reporting a number is not
analysing; an optional ``ledger(out) -> dict`` overrides the header fields run, command,
code_digest, spec_digest); without one, the claims are the hypotheses' verdicts and the
summary table.

A README cites a claim by wrapping the printed text in a marker (invisible when rendered)::

    <!--c persistence/H2.diff-->+0.703 [+0.607, +0.798]<!--/c-->
    <!--c persistence/cell.1.final pct-->60.8%<!--/c-->

``LEDGER/ID`` names the ledger (`ledger_path`) and the claim; an optional format renders the
claim's value instead of its text: a name of `FORMATS` or a `str.format` string over ``v``,
``lo``, ``hi`` and ``p``, ``plo``, ``phi`` (the same times 100). `check_docs` compares every
marker's text with its ledger and lists result-like numbers (percentages, CIs) outside any
marker and any code block; `fill_docs` rewrites marker texts from the ledgers. A number that
is not a run's result but looks like one (a test tolerance, a benchmark timing, a design
value) is marked with its source instead: ``<!--x test tolerance-->within 5%<!--/x-->``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path

import pandas as pd

from toymesa import experiment, store
from toymesa.stats import is_rate, metrics

ROOT = experiment.ROOT
DOCS = ("README.md", "experiments/README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "experiments").glob("*/README.md")))
LEDGER = "claims.json"
FORMATS = {
    "pct": "{p:.1f}%",
    "pct0": "{p:.0f}%",
    "pctci": "{p:.1f}% [{plo:.1f}, {phi:.1f}]",
    "pctci0": "{p:.0f}% [{plo:.0f}, {phi:.0f}]",
    "ci": "{v:+.3f} [{lo:+.3f}, {hi:+.3f}]",
    "ci2": "{v:.2f} [{lo:.2f}, {hi:.2f}]",
    "f1": "{v:.1f}",
    "f2": "{v:.2f}",
    "f3": "{v:.3f}",
    "int": "{v:.0f}",
}
MARK = re.compile(r"<!--c ([\w.-]+)/([^\s>]+)(?: ([^>]*?))?-->(.*?)<!--/c-->", re.S)
NOT_A_RUN = re.compile(r"<!--x ([^>]*?)-->(.*?)<!--/x-->", re.S)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
RESULT_LIKE = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?%|\[[-+]?\d*\.?\d+%?, [-+]?\d*\.?\d+%?\]")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One published number (or verdict, or generated table): `text` is what a README prints."""

    text: str
    value: float | str | None = None
    lo: float | None = None
    hi: float | None = None


def fmt(value, lo=None, hi=None, spec: str = "ci") -> str:
    """`value` (with its CI) rendered by a `FORMATS` name or a format string."""
    spec = FORMATS.get(spec, spec)
    scale = {k: None if x is None else 100 * x for k, x in (("p", value), ("plo", lo), ("phi", hi))}
    return spec.format(v=value, lo=lo, hi=hi, **scale)


def number(value, lo=None, hi=None, spec: str = "ci") -> Claim:
    """A claim of a number (and CI), printed with `fmt`."""
    f = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
    return Claim(fmt(value, lo, hi, spec), f(value), f(lo), f(hi))


def row_claims(df: pd.DataFrame, key: str, metrics, prefix: str, spec: str = "pctci") -> dict[str, Claim]:
    """``{prefix}.{row key}.{metric}`` for every row and metric of a summary table (a metric
    ``m`` with ``m_lo``, ``m_hi``)."""
    out = {}
    for r in df.to_dict("records"):
        for m in metrics:
            if m in r and not pd.isna(r[m]):
                out[f"{prefix}.{r[key]}.{m}"] = number(r[m], r.get(f"{m}_lo"), r.get(f"{m}_hi"), spec)
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table (cells as they are, "|" escaped)."""

    def cell(v) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def runtime(out: Path) -> dict[str, Claim]:
    """``runtime.seconds`` and ``runtime.minutes``: the compute time the run's log.jsonl records
    (the sum over its chunks; installs and compiles included, waiting excluded)."""
    log = Path(out) / "log.jsonl"
    if not log.exists():
        return {}
    seconds = sum(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip())
    return {"runtime.seconds": number(seconds, spec="{v:.0f} s"), "runtime.minutes": number(seconds / 60, spec="{v:.1f} min")}


def verdict_words(judged: pd.DataFrame) -> dict[str, Claim]:
    """``ID.verdict`` and ``ID.evidence`` of each hypothesis of a verdicts frame."""
    claims = {}
    for r in judged.to_dict("records"):
        claims[f"{r['id']}.verdict"] = Claim(str(r["verdict"]), str(r["verdict"]))
        claims[f"{r['id']}.evidence"] = Claim(str(r.get("evidence", "")))
    return claims


def run_facts(out: Path, df: pd.DataFrame | None = None) -> dict[str, Claim]:
    """What a README says about a run itself: its compute time (`runtime`), ``run.date`` (when
    its last chunk finished), ``run.code_digest``, ``run.cells`` and ``run.seeds`` (of its
    results frame `df`), and ``run.cores`` (on CPU, one device per core: `toymesa.cli`)."""
    out = Path(out)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    log = out / "log.jsonl"
    finished = [json.loads(line)["finished"] for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    claims = runtime(out)
    if finished:
        claims["run.date"] = Claim(max(finished)[:10])
    if meta.get("code_digest"):
        claims["run.code_digest"] = Claim(meta["code_digest"], meta["code_digest"])
    if df is not None:
        claims["run.cells"] = number(df["cell"].nunique(), spec="int")
        claims["run.seeds"] = number(df["seed"].nunique(), spec="int")
    if meta.get("devices", {}).get("platform") == "cpu":
        claims["run.cores"] = number(meta["devices"]["n_devices"], spec="int")
    return claims


def generic(out: Path) -> dict[str, Claim]:
    """Claims of an experiment without a claims.py: each hypothesis' verdict and evidence, the
    summary table (``cell.N.METRIC``) and the run's compute time."""
    exp = experiment.for_results(out)
    claims = verdict_words(exp.verdicts(out))
    summary = pd.read_csv(out / "summary.csv")
    for m in metrics(summary):
        claims |= row_claims(summary, "cell", [m], "cell", "pctci" if is_rate(summary, m) else "ci")
    return claims | runtime(out)


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"toymesa_claims.{path.parent.name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def source(out: Path) -> tuple[str, Path | None]:
    """(ledger name, the experiment's claims.py or None) of a results folder: the experiment's
    own ``experiments/NAME/results`` folder, or a run folder whose meta.json names it."""
    out = Path(out).resolve()
    if out.name == "results" and (out.parent / "claims.py").exists():
        return out.parent.name, out.parent / "claims.py"
    if not (out / "meta.json").exists():
        raise FileNotFoundError(f"{out} is neither a run folder (no meta.json) nor an experiment's results folder with a claims.py beside it")
    name = json.loads((out / "meta.json").read_text())["name"]
    if name == "demo":  # the built-in demo's claims live beside it in the package
        return name, Path(__file__).with_name("demo_claims.py")
    path = experiment.EXPERIMENTS / name / "claims.py"
    return name, path if path.exists() else None


def derive(out) -> dict:
    """The ledger of results folder `out`, computed from its stored files."""
    out = Path(out)
    name, path = source(out)
    mod = _module(path) if path is not None else None
    claims = mod.claims(out) if mod is not None else generic(out)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    head = {"ledger": name, "run": _shown(out), "command": f"toymesa run {name}", "code_digest": meta.get("code_digest"), "spec_digest": meta.get("digest")}
    head |= mod.ledger(out) if hasattr(mod, "ledger") else {}  # a study that is not a sweep says where its numbers come from
    return {
        **head,
        "derived_by": f"toymesa claims {_shown(out)}",
        "claims": {k: {f: v for f, v in dataclasses.asdict(c).items() if v is not None} for k, c in sorted(claims.items())},
    }


def _shown(out: Path) -> str:
    out = Path(out).resolve()
    return out.relative_to(ROOT).as_posix() if out.is_relative_to(ROOT) else str(out)


def write(out, dest=None) -> Path:
    """Derive the ledger of `out` and write it to `dest` (default OUT/claims.json)."""
    return store.save_json(derive(out), Path(out) / LEDGER if dest is None else Path(dest))


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two ledgers, one line per claim (or header field)."""
    lines = [
        f"{k}: {old.get(k)!r} stored, {new.get(k)!r} re-derived" for k in ("ledger", "run", "command", "code_digest", "spec_digest") if old.get(k) != new.get(k)
    ]
    a, b = old.get("claims", {}), new.get("claims", {})
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {_brief(a.get(k))} stored, {_brief(b.get(k))} re-derived")
    return lines


def _brief(c) -> str:
    if c is None:
        return "absent"
    text = c["text"]
    return repr(text if len(text) < 60 else text[:57] + "...")


# ----------------------------------------------------------------- READMEs
def ledger_path(name: str, root: Path = ROOT) -> Path:
    """Where ledger `name` is kept: the experiment's stored results, else docs/claims/NAME.json
    (the ledger of a run that is not shipped, such as the demo's)."""
    shipped = root / "experiments" / name / "results" / LEDGER
    return shipped if shipped.exists() else root / "docs" / "claims" / f"{name}.json"


def _ledgers(names, root: Path) -> dict[str, dict | None]:
    return {n: (json.loads(p.read_text()) if (p := ledger_path(n, root)).exists() else None) for n in names}


def rendered(ledger: dict | None, cid: str, spec: str | None) -> str | None:
    """The text claim `cid` of `ledger` prints as (None: no such claim)."""
    c = (ledger or {}).get("claims", {}).get(cid)
    if c is None:
        return None
    if not spec:
        return c["text"]
    return fmt(c.get("value"), c.get("lo"), c.get("hi"), spec)


def check_text(text: str, doc: str, root: Path = ROOT) -> list[str]:
    """Problems of one README's text: markers whose text differs from their ledger (naming the
    claim, the printed and the ledger text), markers of unknown ledgers or claims, and
    result-like numbers outside markers and code blocks."""
    marks = _citations(text)
    ledgers = _ledgers({m.group(1) for m in marks}, root)
    problems = []
    for m in marks:
        name, cid, spec, shown = m.groups()
        line = text.count("\n", 0, m.start()) + 1
        if ledgers[name] is None:
            problems.append(f"{doc}:{line}: ledger {name!r} not found ({ledger_path(name, root).relative_to(root)}); run `toymesa claims` on its run")
            continue
        want = rendered(ledgers[name], cid, spec)
        if want is None:
            problems.append(f"{doc}:{line}: {name}/{cid}: no such claim in {ledger_path(name, root).relative_to(root)}")
        elif shown.strip("\n") != want.strip("\n"):
            problems.append(f"{doc}:{line}: {name}/{cid}: README says {_clip(shown)}, ledger says {_clip(want)}")
    fenced, before = False, ""
    for i, line in enumerate(text.split("\n"), start=1):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("<!--") and before.strip() and not before.startswith("|"):
            problems.append(f"{doc}:{i}: a marker opens a line inside a paragraph (markdown would end the paragraph there); move it after a word")
        before = line
    for x in NOT_A_RUN.finditer(text):
        if not x.group(1).strip():
            problems.append(f"{doc}:{text.count(chr(10), 0, x.start()) + 1}: <!--x--> needs a reason: where the number comes from, if not a run")
    bare = FENCE.sub(_blank, NOT_A_RUN.sub(_blank, MARK.sub(_blank, text)))
    bare = INLINE_CODE.sub("", bare)
    for hit in RESULT_LIKE.finditer(bare):
        line = bare.count("\n", 0, hit.start()) + 1
        problems.append(f"{doc}:{line}: {hit.group()!r} looks like a result but cites no claim (wrap it in <!--c LEDGER/ID-->...<!--/c-->)")
    return problems


def _citations(text: str) -> list[re.Match]:
    """The markers of `text` that cite a claim: all but those inside a code block or inline code
    (examples of the syntax, as in this project's README)."""
    code = [m.span() for m in FENCE.finditer(text)]
    code += [m.span() for m in INLINE_CODE.finditer(FENCE.sub(lambda m: " " * len(m.group()), text))]
    return [m for m in MARK.finditer(text) if not any(a <= m.start() < b for a, b in code)]


def _blank(m) -> str:
    """A match replaced by its line breaks only (line numbers stay right)."""
    return "\n" * m.group().count("\n")


def _clip(s: str) -> str:
    s = s.replace("\n", " / ")
    return repr(s if len(s) < 80 else s[:77] + "...")


def check_docs(root: Path = ROOT, docs=DOCS) -> list[str]:
    """Problems of every README (see `check_text`); empty when all cite their ledgers."""
    return [p for d in docs if (root / d).exists() for p in check_text((root / d).read_text(), d, root)]


def fill_text(text: str, root: Path = ROOT) -> str:
    """`text` with every marker's text replaced by its ledger's (unknown claims left as they are)."""
    marks = _citations(text)
    cited = {m.start() for m in marks}
    ledgers = _ledgers({m.group(1) for m in marks}, root)

    def one(m) -> str:
        if m.start() not in cited:  # an example in code, not a citation
            return m.group()
        name, cid, spec, shown = m.groups()
        want = rendered(ledgers[name], cid, spec)
        head = m.group()[: m.start(4) - m.start()]
        if want is not None and shown.startswith("\n"):  # a block (a generated table): keep its blank lines
            body = shown.strip("\n")
            want = shown[: shown.index(body)] + want.strip("\n") + shown[shown.index(body) + len(body) :] if body else "\n" + want.strip("\n") + "\n"
        return f"{head}{shown if want is None else want}<!--/c-->"

    return MARK.sub(one, text)


def fill_docs(root: Path = ROOT, docs=DOCS) -> list[str]:
    """Rewrite every README's marker texts from the ledgers; returns the files changed."""
    changed = []
    for d in docs:
        path = root / d
        if path.exists() and (new := fill_text(old := path.read_text(), root)) != old:
            store.save_text(new, path)
            changed.append(d)
    return changed
