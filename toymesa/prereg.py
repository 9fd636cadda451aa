"""Preregistration: decision rules stated as data, verdicts that follow them, and the record.

**Rules.** A hypothesis's `rule` says, before any result exists, which confidence interval
(CI) confirms its prediction and which refutes it. It is data, so the verdict code and the
text shown to readers are generated from the same object and cannot diverge::

    rule = { confirm = "low > 0", refute = "high < 0" }          # a one-sided comparison
    rule = { equivalence = 0.1 }                                  # a null: CI inside [-0.1, 0.1]
    rule = { confirm = "high < 0", refute = "low > 0", combine = "all" }   # several parts

A condition is ``"low|high  >|>=|<|<=  number"`` on the CI's lower or upper end; strictness is
what is written. `combine` (for hypotheses with several parts, e.g. one per rule) is ``all``:
confirmed when every part confirms, refuted when any part refutes; or ``all_none_refutes``:
the same, and also refuted when no part confirms. `render` writes the rule as text.

**Verdicts.** `judge(rule, parts)` evaluates a rule on `Part`s (one CI each, with the per-seed
values of the arms it compares). A comparison whose arms all sit at the same bound (every
value 0, or every value 1) cannot discriminate: its verdict is ``at ceiling: cannot
discriminate`` (or ``at floor``), never confirmed or refuted. Members whose training went
non-finite are excluded from the arms and counted in the evidence and the verdict.

**The record.** `register` keeps an append-only JSON record of a sweep's hypotheses. Schema::

    {"registered": time, "results_existed": bool,       # at the first call
     "provenance": {...},                               # at the first call, see below
     "hypotheses": [version, ...],                      # as first registered; never rewritten
     "amendments": [{"id": id, "kind": "edited" | "added" | "removed",
                     "old": version | null, "new": version | null,
                     "at": time, "results_existed": bool, "provenance": {...}}, ...],
     "analyses": [{"digest": d, "at": time, "results_existed": bool}, ...]}  # each analysis seen

Provenance: the git commit, the spec digest, the analysis code's digest, and the run folders
under the results roots that already held results of the same spec digest (so a fresh folder
cannot claim that no results had been seen). A version is the hypothesis's fields plus
"digest" (`hypothesis_digest`). `registration_status` says which hypotheses can still be judged
as preregistered; `analysis_status` whether the analysis changed after results existed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from toymesa import store

# Spelled out, not taken from spec.py: adding a spec key must not change existing digests.
HYPOTHESIS_FIELDS = ("id", "statement", "prediction", "metric", "test", "rule")
HYPOTHESIS_KEYS = {*HYPOTHESIS_FIELDS}  # the keys a spec's [[hypotheses]] table may hold
VERDICTS = ("confirmed", "refuted", "inconclusive", "at ceiling: cannot discriminate", "at floor: cannot discriminate")
COMBINE = {
    "all": "every part must confirm; any part refuting refutes",
    "all_none_refutes": "every part must confirm; any part refuting, or none confirming, refutes",
}
_CONDITION = re.compile(r"^\s*(low|high)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}


class RuleError(ValueError):
    """A decision rule that cannot be evaluated as written."""


@dataclass(frozen=True)
class Condition:
    """``bound op value`` on a CI: bound is "low" or "high"."""

    bound: str
    op: str
    value: float

    def holds(self, low: float, high: float) -> bool:
        return bool(_OPS[self.op]({"low": low, "high": high}[self.bound], self.value))

    def __str__(self) -> str:
        return f"CI {self.bound} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Rule:
    """A parsed decision rule: (confirm, refute) conditions, or an equivalence margin."""

    confirm: Condition | None = None
    refute: Condition | None = None
    equivalence: float | None = None
    combine: str = "all"

    def call(self, low: float, high: float) -> str:
        """confirmed / refuted / inconclusive for one CI [low, high] (NaN: inconclusive)."""
        if np.isnan(low) or np.isnan(high):
            return "inconclusive"
        if self.equivalence is not None:
            m = self.equivalence
            return "confirmed" if -m <= low and high <= m else "refuted" if low > m or high < -m else "inconclusive"
        return "confirmed" if self.confirm.holds(low, high) else "refuted" if self.refute.holds(low, high) else "inconclusive"


def _condition(text, key: str) -> Condition:
    m = _CONDITION.match(text) if isinstance(text, str) else None
    if m is None:
        raise RuleError(f"rule.{key}={text!r} is invalid: write 'low > 0', 'high <= 0.5', ... (CI end, one of > >= < <=, a number)")
    return Condition(m[1], m[2], float(m[3]))


def parse_rule(raw: dict) -> Rule:
    """A `Rule` from its spec form (a dict); RuleError naming the key on anything else."""
    if not isinstance(raw, dict):
        raise RuleError(f"rule={raw!r} is invalid: give a table, e.g. {{ confirm = 'low > 0', refute = 'high < 0' }} or {{ equivalence = 0.1 }}")
    unknown = sorted(set(raw) - {"confirm", "refute", "equivalence", "combine"})
    if unknown:
        raise RuleError(f"rule.{unknown[0]} is unknown: valid keys are confirm, refute, equivalence, combine")
    combine = raw.get("combine", "all")
    if combine not in COMBINE:
        raise RuleError(f"rule.combine={combine!r} is invalid: choose one of {tuple(COMBINE)}")
    if "equivalence" in raw:
        m = raw["equivalence"]
        if {"confirm", "refute"} & set(raw):
            raise RuleError("rule: give either equivalence (a margin) or confirm and refute, not both")
        if isinstance(m, bool) or not isinstance(m, int | float) or not np.isfinite(m) or m <= 0:
            raise RuleError(f"rule.equivalence={m!r} is invalid: give a positive, finite margin")
        return Rule(equivalence=float(m), combine=combine)
    for key in ("confirm", "refute"):
        if key not in raw:
            raise RuleError(f"rule.{key} is missing: a rule needs both confirm and refute (or an equivalence margin)")
    rule = Rule(_condition(raw["confirm"], "confirm"), _condition(raw["refute"], "refute"), combine=combine)
    _check_exclusive(rule)
    return rule


def _check_exclusive(rule: Rule) -> None:
    """Refuse rules under which one CI could both confirm and refute."""
    ts = sorted({rule.confirm.value, rule.refute.value})
    points = sorted({t + d for t in ts for d in (-1e-9, 0.0, 1e-9)} | {ts[0] - 1, ts[-1] + 1})
    for i, low in enumerate(points):
        for high in points[i:]:
            if rule.confirm.holds(low, high) and rule.refute.holds(low, high):
                raise RuleError(f"rule: the CI [{low:g}, {high:g}] would both confirm ({rule.confirm}) and refute ({rule.refute}); make them exclusive")


def render(rule: Rule | dict, parts: int = 1, comparison: bool = True) -> str:
    """The rule as one sentence (what readers see next to the verdict): for `parts` CIs, of a
    comparison between arms (which adds the ceiling/floor clause) or of a level."""
    rule = parse_rule(rule) if isinstance(rule, dict) else rule
    if rule.equivalence is not None:
        m = rule.equivalence
        text = f"confirmed if the CI lies inside [-{m:g}, {m:g}]; refuted if it lies entirely outside; otherwise inconclusive"
    else:
        text = f"confirmed if {rule.confirm}; refuted if {rule.refute}; otherwise inconclusive"
    if parts > 1:
        text += f" (per part; {COMBINE[rule.combine]})"
    return text + ("; a comparison with every arm at 0 or every arm at 1 cannot discriminate" if comparison else "")


def check_hypotheses(items, fail) -> tuple[dict, ...]:
    """Validate a spec's ``[[hypotheses]]`` (a list of dicts) and return them as a tuple.

    Each needs a unique non-empty id, statement and prediction; `metric` must be one the runner
    records; `rule` must parse (`parse_rule`). Problems go to ``fail(key, problem)``, which raises.
    """
    if not isinstance(items, list):
        fail("hypotheses", "must be an array of tables: [[hypotheses]] with id, statement, prediction")
    seen = set()
    for i, h in enumerate(items):
        where = f"hypotheses[{i}]"
        if not isinstance(h, dict):
            fail(where, "must be a table with id, statement, prediction")
        unknown = sorted(set(h) - HYPOTHESIS_KEYS)
        if unknown:
            fail(f"{where}.{unknown[0]}", f"unknown key; valid keys are {sorted(HYPOTHESIS_KEYS)}")
        for key in ("id", "statement", "prediction"):
            if not isinstance(h.get(key), str) or not h[key].strip():
                fail(f"{where}.{key}", "is required and must be a non-empty string")
        if h["id"] in seen:
            fail(f"{where}.id", f"{h['id']!r} is used twice")
        if "metric" in h:
            from toymesa import evaluate, runs  # lazily: validating a spec needs no JAX otherwise

            known = (*evaluate.METRICS, *runs.TRAIN_METRICS, "adv_found")
            if h["metric"] not in known:
                close = [m for m in known if m.split("_")[0] == str(h["metric"]).split("_")[0]][:4]
                fail(f"{where}.metric", f"{h['metric']!r} is not a metric the runner records; e.g. {close or list(known[:4])} (all: toymesa.evaluate.METRICS)")
        if "rule" in h:
            try:
                parse_rule(h["rule"])
            except RuleError as e:
                fail(where, str(e))
        seen.add(h["id"])
    return tuple(items)


# ------------------------------------------------------------------ verdicts
@dataclass(frozen=True)
class Arm:
    """One compared group: finite per-seed values, and how many members were non-finite."""

    name: str
    values: np.ndarray
    nonfinite: int = 0


@dataclass(frozen=True)
class Part:
    """One CI a rule is evaluated on: label, (estimate, low, high) and the arms it compares
    (one arm: a level against a threshold; two or more: a comparison)."""

    label: str
    estimate: tuple[float, float, float]
    arms: tuple[Arm, ...] = field(default_factory=tuple)

    def pinned(self) -> str | None:
        """ "ceiling" / "floor" when this is a comparison whose every value is 1 / 0."""
        if len(self.arms) < 2:
            return None
        values = np.concatenate([np.asarray(a.values, float).ravel() for a in self.arms])
        if values.size == 0:
            return None
        return "ceiling" if np.all(values == 1) else "floor" if np.all(values == 0) else None


def arm(name: str, values, nonfinite=None) -> Arm:
    """An `Arm` from per-seed values float[N] and an optional bool[N] of non-finite members
    (their values are dropped; NaN values count as non-finite members)."""
    v = np.asarray(values, float).ravel()
    bad = np.isnan(v) if nonfinite is None else np.asarray(nonfinite, bool).ravel() | np.isnan(v)
    return Arm(name, v[~bad], int(bad.sum()))


def _part_call(rule: Rule, part: Part) -> str:
    where = part.pinned()
    return f"at {where}: cannot discriminate" if where else rule.call(part.estimate[1], part.estimate[2])


def judge(rule: Rule | dict, parts: list[Part]) -> tuple[str, str]:
    """(verdict, evidence) of a rule on its parts.

    One part: the rule's call on its CI, or "at ceiling/floor: cannot discriminate". Several:
    combined as `rule.combine` says; a part at a bound counts as neither confirming nor refuting,
    and when it keeps the hypothesis from being decided the verdict says so. The evidence lists
    each part's estimate and CI, the arms' n, and every excluded non-finite member; the verdict
    gains " [k non-finite members excluded]" when there are any.
    """
    rule = parse_rule(rule) if isinstance(rule, dict) else rule
    if not parts:
        raise RuleError("judge needs at least one part")
    calls = [_part_call(rule, p) for p in parts]
    if len(parts) == 1:
        verdict = calls[0]
    elif "refuted" in calls or (rule.combine == "all_none_refutes" and "confirmed" not in calls and not any(c.startswith("at ") for c in calls)):
        verdict = "refuted"
    elif all(c == "confirmed" for c in calls):
        verdict = "confirmed"
    else:
        pinned = [c for c in calls if c.startswith("at ")]
        verdict = pinned[0] if pinned else "inconclusive"
    evidence = "; ".join(_describe(p, c, len(parts) > 1) for p, c in zip(parts, calls, strict=True))
    bad = sum(a.nonfinite for p in parts for a in p.arms)
    if bad:
        verdict += f" [{bad} non-finite member{'s' * (bad != 1)} excluded]"
    return verdict, evidence


def _describe(part: Part, call: str, several: bool) -> str:
    e, lo, hi = part.estimate
    text = f"{part.label}: {e:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    count = lambda a: f"n={a.values.size}" + (f" +{a.nonfinite} non-finite" if a.nonfinite else "")
    if len(part.arms) == 1:
        text += f" ({count(part.arms[0])})"
    elif part.arms:
        text += " (" + ", ".join(f"{a.name} {count(a)}" for a in part.arms) + ")"
    if part.pinned():
        text += f" every arm at the {part.pinned()}"
    return text + (f" -> {call}" if several else "")


def verdict_table(hypotheses, parts: dict) -> pd.DataFrame:
    """One row per hypothesis (id, statement, prediction, rule, verdict, evidence): each judged by
    its own `rule` on `parts[id]` (a list of `Part`); without a rule or parts, "not evaluated"."""
    rows = []
    for h in hypotheses:
        row = {k: h.get(k, "") for k in ("id", "statement", "prediction")}
        if "rule" in h and parts.get(h["id"]):
            row["rule"] = render(h["rule"], len(parts[h["id"]]), any(len(p.arms) > 1 for p in parts[h["id"]]))
            row["verdict"], row["evidence"] = judge(h["rule"], parts[h["id"]])
        else:
            why = "no rule stated as data" if "rule" not in h else "the analysis computes no parts for it"
            row.update(rule="", verdict="not evaluated", evidence=why)
        rows.append(row)
    return pd.DataFrame(rows, columns=["id", "statement", "prediction", "rule", "verdict", "evidence"])


# ------------------------------------------------------------------ the record
def hypothesis_digest(h: dict) -> str:
    """First 12 hex digits of sha256 of the canonical JSON of h's id, statement, prediction,
    metric, test and rule. Keys h lacks are left out; text is taken verbatim, so any edit
    (whitespace included) changes it."""
    fields = {k: h[k] for k in HYPOTHESIS_FIELDS if k in h}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _version(h: dict) -> dict:
    return {k: h[k] for k in HYPOTHESIS_FIELDS if k in h} | {"digest": hypothesis_digest(h)}


def _current(record: dict) -> dict[str, dict | None]:
    """id -> its latest version (None once removed), replaying the amendments in order."""
    latest = {v["id"]: v for v in record["hypotheses"]}
    for a in record["amendments"]:
        latest[a["id"]] = a["new"]
    return latest


def register(path, hypotheses, results_exist: bool, now: str | None = None, provenance: dict | None = None) -> dict:
    """Record `hypotheses` in the JSON file `path` (schema in the module docstring); returns the record.

    The first call stores every hypothesis and `provenance`. Later calls append one amendment
    per hypothesis that is new ("added"), whose digest differs from its current version
    ("edited"), or that is gone ("removed"), stamped with `now` (default: UTC now),
    `results_exist` and `provenance`; and an entry to "analyses" when the provenance's
    ``analysis_digest`` differs from the last one seen. Earlier entries are never changed. The
    file is replaced atomically, and only when something changed.
    """
    path, at = Path(path), now or datetime.now(UTC).isoformat(timespec="seconds")
    prov = dict(provenance or {})
    versions = [_version(h) for h in hypotheses]
    ids = [v["id"] for v in versions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"hypothesis ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    analysis = {"digest": prov.get("analysis_digest"), "at": at, "results_existed": bool(results_exist)}
    if not path.exists():
        record = {
            "registered": at,
            "results_existed": bool(results_exist),
            "provenance": prov,
            "hypotheses": versions,
            "amendments": [],
            "analyses": [analysis],
        }
        store.save_json(record, path)
        return record
    record = store.load_json(path)
    latest = _current(record)
    amend = lambda i, kind, old, new: {"id": i, "kind": kind, "old": old, "new": new, "at": at, "results_existed": bool(results_exist), "provenance": prov}
    new = [amend(v["id"], "added", None, v) for v in versions if latest.get(v["id"]) is None]
    new += [amend(v["id"], "edited", latest[v["id"]], v) for v in versions if latest.get(v["id"]) and latest[v["id"]]["digest"] != v["digest"]]
    new += [amend(i, "removed", old, None) for i, old in latest.items() if old is not None and i not in ids]
    analyses = record.setdefault("analyses", [])
    changed = bool(new)
    if not analyses or analyses[-1]["digest"] != analysis["digest"]:
        analyses.append(analysis)
        changed = True
    if changed:
        record["amendments"].extend(new)
        store.save_json(record, path)
    return record


def registration_status(record: dict) -> dict[str, str]:
    """id -> standing of every hypothesis the record has seen, first match wins.

    Removed: "REMOVED AFTER RESULTS" or "removed before results" (by the removal). Present:
    "REGISTERED AFTER RESULTS" (first call made when results existed), "ADDED AFTER RESULTS",
    "EDITED AFTER RESULTS" (any amendment made when results existed), "amended before results",
    "as registered" (never amended).
    """
    status = {}
    for i, current in _current(record).items():
        amendments = [a for a in record["amendments"] if a["id"] == i]
        first_registered = any(v["id"] == i for v in record["hypotheses"])
        if current is None:
            status[i] = "REMOVED AFTER RESULTS" if amendments[-1]["results_existed"] else "removed before results"
        elif first_registered and record["results_existed"]:
            status[i] = "REGISTERED AFTER RESULTS"
        elif not first_registered and amendments[0]["results_existed"]:
            status[i] = "ADDED AFTER RESULTS"
        elif any(a["results_existed"] for a in amendments):
            status[i] = "EDITED AFTER RESULTS"
        else:
            status[i] = "amended before results" if amendments else "as registered"
    return status


def analysis_status(record: dict, digest: str | None) -> str:
    """Whether the analysis code with `digest` is the one registered.

    "as registered" (the first analysis the record saw, or one seen before any results),
    "ANALYSIS CHANGED AFTER RESULTS" (a digest first seen when results existed), "not recorded"
    (a record from before analysis digests were kept, or no analysis file)."""
    seen = [a for a in record.get("analyses", []) if a.get("digest")]
    if digest is None or not seen:
        return "not recorded"
    first = next((a for a in seen if a["digest"] == digest), None)
    if first is None or first["results_existed"] and first is not seen[0]:
        return "ANALYSIS CHANGED AFTER RESULTS"
    return "as registered"


def original(record: dict, id: str) -> dict:
    """The first registered version of hypothesis `id`: what its verdict is judged against."""
    versions = [v for v in record["hypotheses"] if v["id"] == id] + [a["new"] for a in record["amendments"] if a["id"] == id and a["kind"] == "added"]
    if versions:
        return versions[0]
    raise KeyError(f"hypothesis {id!r} is not in the record; ids: {sorted(_current(record))}")
