"""A small, fast mutation check: does the test suite notice a curated list of one-line bugs?

Each mutant in `mutants.toml` replaces one exact substring (`find`, which must occur exactly
once in `file`) by `replace` and runs the test files that should catch it::

    python -m pytest -x -q -p no:cacheprovider -m "not slow" <its tests>

A mutant is *killed* when pytest exits non-zero (a failure, or an import/collection error the
mutant causes; a run past `--timeout` counts as killed and is listed apart), *survived* when
the tests pass. A `find` that does not occur exactly once is *stale*: an error in the list,
reported and making the exit status non-zero. Mutants marked ``equivalent = "reason"`` cannot
be caught by any test (same behaviour); they are listed apart, not run, and left out of the
kill rate = killed / (killed + survived).

Why not mutmut: it generates thousands of mutants per file and re-runs the suite for each, with
every run paying JAX's compiles again (seconds per program on 2 cores): hours for these files.
A curated list of bugs that model real mistakes (each with a `why`), each run only against the
test files meant to catch it, with `-x`, finishes in minutes and says which bug got through.

Isolation: every worker copies `toymesa/`, `tests/`, `experiments/` (without
`experiments/*/results`) and `pyproject.toml` into a temporary directory and mutates only its
copy; the working tree is never written. The copy is put first on the import path
(PYTHONPATH=copy, cwd=copy) ahead of the editable install of the working tree, and a guard
plugin fails the run (exit 99, reported as an error, not a kill) if `toymesa` was not imported
from the copy or any module was imported from the working tree. Bytecode caching is off, so a
same-size mutant written within the same second as the original is never served a stale .pyc.
An interrupt (Ctrl-C, SIGTERM) ends the running tests and removes the copies.

Usage (repository root)::

    python tests/mutate/run.py                       # every mutant, 2 workers, --min 0.9
    python tests/mutate/run.py --only rl-logp-ignores-temperature --only kl-weighted-by-reference
    python tests/mutate/run.py --file toymesa/tasks/rules.py
    python tests/mutate/run.py --tests tests/test_safety.py tests/test_tasks.py   # every mutant against these instead
    python tests/mutate/run.py --exclude tests/test_coverage.py                    # drop a test file from every mutant

Exit status: 0 when the kill rate is >= --min and the list has no errors, 1 otherwise (130 if interrupted).
Makefile: `make mutate` (MUTATE_ARGS="--only ID" for a subset).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COPY = ("toymesa", "tests", "experiments", "theory", "docs", "README.md", "pyproject.toml")  # the READMEs and ledgers: the claims tests read them
REQUIRED = ("id", "file", "find", "replace", "tests", "why")
GUARD_EXIT = 99

# A pytest plugin written into each copy: fails the session with GUARD_EXIT if toymesa was not
# imported, or if any module was imported from the working tree (e.g. through the editable
# install of toymesa) instead of the copy; the working tree's virtual environment is allowed.
GUARD = """
import os, sys
COPY = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
TREE, VENV = REPO_ROOT, os.path.realpath(sys.prefix)

def pytest_sessionfinish(session, exitstatus):
    files = {n: os.path.realpath(f) for n, m in list(sys.modules.items()) if isinstance(f := getattr(m, "__file__", None), str)}
    bad = {n: f for n, f in files.items() if f.startswith(TREE + os.sep) and not f.startswith(VENV + os.sep)}
    mine = files.get("toymesa", "").startswith(COPY + os.sep)
    if bad or not mine:
        print(f"\\nMUTATE GUARD: not testing the copy {COPY}: toymesa from {files.get('toymesa')}, from the tree: {bad}")
        session.exitstatus = GUARD_EXIT
""".replace("GUARD_EXIT", str(GUARD_EXIT)).replace("REPO_ROOT", repr(os.path.realpath(ROOT)))


@dataclass
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    tests: list[str]
    why: str
    equivalent: str | None = None
    status: str = "pending"  # killed, survived, timeout, stale, error, equivalent
    detail: str = ""
    seconds: float = 0.0


def load(path: Path) -> list[Mutant]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"{path}: not valid TOML: {e}") from None
    out, seen = [], set()
    for i, m in enumerate(data.get("mutant", [])):
        missing = [k for k in REQUIRED if k not in m]
        unknown = sorted(set(m) - set(REQUIRED) - {"equivalent"})
        if missing or unknown:
            raise SystemExit(f"{path}: mutant #{i + 1} ({m.get('id', '?')}): missing {missing}, unknown keys {unknown}")
        if m["id"] in seen:
            raise SystemExit(f"{path}: duplicate mutant id {m['id']!r}")
        seen.add(m["id"])
        tests = [m["tests"]] if isinstance(m["tests"], str) else list(m["tests"])
        out.append(Mutant(m["id"], m["file"], m["find"], m["replace"], tests, m["why"].strip(), m.get("equivalent")))
    return out


def check(m: Mutant) -> None:
    """Mark m stale (find not exactly once) or error (bad entry), reading the working tree."""
    src = ROOT / m.file
    if not src.is_file():
        m.status, m.detail = "stale", f"{m.file} does not exist"
        return
    n = src.read_text().count(m.find)
    if n != 1:
        m.status, m.detail = "stale", f"`find` occurs {n} times in {m.file} (must be exactly once)"
        return
    if "\n" in m.find or "\n" in m.replace:
        m.status, m.detail = "error", "find and replace must each lie on one line"
    elif m.find == m.replace:
        m.status, m.detail = "error", "replace equals find: not a mutant"
    elif not m.tests:
        m.status, m.detail = "error", "no tests to run"
    else:
        gone = [t for t in m.tests if not (ROOT / t.split("::")[0]).exists()]
        if gone:
            m.status, m.detail = "error", f"test paths not found: {gone}"


def _ignore(src: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in ("__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache") or n.endswith(".pyc")}
    rel = Path(src).resolve().relative_to(ROOT)
    if len(rel.parts) == 3 and rel.parts[0] == "experiments" and rel.parts[2] == "results":
        skip |= {"installs"} & set(names)  # trained parameters (80 MB): the tests read chunks, tables and ledgers
    return skip


def make_copy(base: Path) -> Path:
    base.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, base / name, ignore=_ignore)
        elif src.exists():
            shutil.copy2(src, base / name)
    (base / "_mutate_guard.py").write_text(GUARD)
    return base


def env_for(copy: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def verify_import(copy: Path, python: str) -> str:
    """The file `import toymesa` resolves to in the copy; raises if it is not the copy's."""
    out = subprocess.run([python, "-c", "import toymesa; print(toymesa.__file__)"], cwd=copy, env=env_for(copy), capture_output=True, text=True, check=True)
    got = out.stdout.strip()
    if not os.path.realpath(got).startswith(os.path.realpath(copy) + os.sep):
        raise SystemExit(f"import toymesa in the copy {copy} picked {got}: the mutants would not be tested")
    return got


_LIVE: set[subprocess.Popen] = set()  # running pytest processes, ended on interrupt
_LIVE_LOCK = threading.Lock()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_all() -> None:
    with _LIVE_LOCK:
        for proc in list(_LIVE):
            _kill(proc)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _parallel(fn, items: list, workers: int | None = None) -> list:
    """[fn(x) for x in items] on `workers` threads (default: one each). On an interrupt the pool is
    left without waiting (its threads wait on pytest processes, which the caller then kills)."""
    pool = ThreadPoolExecutor(workers or len(items))
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_pytest(copy: Path, tests: list[str], python: str, timeout: float) -> tuple[str, str, float]:
    """(outcome, first failing test or error line, seconds); outcome: passed, failed, timeout, guard, usage."""
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "_mutate_guard", "-m", "not slow", *tests]
    t0 = time.perf_counter()
    # own session (process group), so a timeout or an interrupt can end pytest and whatever it started
    proc = subprocess.Popen(cmd, cwd=copy, env=env_for(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.communicate()
        return "timeout", f"no result after {timeout:.0f} s", time.perf_counter() - t0
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    dt = time.perf_counter() - t0
    if proc.returncode == 0:
        return "passed", "", dt
    if proc.returncode == GUARD_EXIT:
        return "guard", next((ln for ln in out.splitlines() if "MUTATE GUARD" in ln), out[-500:]), dt
    if proc.returncode in (4, 5):  # usage error (e.g. a test id not found) or nothing collected: the list is wrong
        return "usage", " ".join(out.strip().splitlines()[-3:])[-300:], dt
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return "failed", first.group(1) if first else " ".join(out.strip().splitlines()[-2:])[-300:], dt


def mutate_and_run(m: Mutant, copy: Path, python: str, timeout: float) -> None:
    target = copy / m.file
    original = target.read_text()
    if original.count(m.find) != 1:  # the copy must match the checked working tree
        m.status, m.detail = "stale", f"`find` occurs {original.count(m.find)} times in the copy of {m.file}"
        return
    try:
        target.write_text(original.replace(m.find, m.replace))
        outcome, detail, m.seconds = run_pytest(copy, m.tests, python, timeout)
    finally:
        target.write_text(original)
    m.status = {"passed": "survived", "failed": "killed", "timeout": "timeout", "guard": "error", "usage": "error"}[outcome]
    m.detail = detail


def rate(mutants: list[Mutant]) -> tuple[int, int, float]:
    killed = sum(m.status in ("killed", "timeout") for m in mutants)
    survived = sum(m.status == "survived" for m in mutants)
    return killed, survived, killed / (killed + survived) if killed + survived else float("nan")


def report(mutants: list[Mutant], args, wall: float, baseline: str) -> str:
    killed, survived, r = rate(mutants)
    by = lambda s: [m for m in mutants if m.status == s]
    lines = [
        "# Mutation check",
        "",
        f"`{' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`, {time.strftime('%Y-%m-%d %H:%M')}, {args.workers} workers, wall {wall:.0f} s.",
        f"{baseline}",
        "",
        f"**Kill rate {r:.0%}** ({killed} killed of {killed + survived}; threshold {args.min:.0%}). "
        f"Killed {len(by('killed'))}, timeout {len(by('timeout'))}, survived {survived}, "
        f"equivalent {len(by('equivalent'))}, stale {len(by('stale'))}, error {len(by('error'))}.",
        "",
    ]
    if args.tests or args.exclude:
        lines += [f"Tests overridden: {args.tests or ''} excluded: {args.exclude or ''}", ""]

    def table(title, rows, cols):
        if not rows:
            return
        lines.extend([f"## {title}", "", "| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)])
        for m in rows:
            lines.append("| " + " | ".join(str(f(m)).replace("|", "\\|").replace("\n", " ") for _, f in cols) + " |")
        lines.append("")

    table(
        "Survived",
        by("survived"),
        [("id", lambda m: m.id), ("file", lambda m: m.file), ("why (the bug it models)", lambda m: m.why), ("tests", lambda m: " ".join(m.tests))],
    )
    table("Stale or broken entries", by("stale") + by("error"), [("id", lambda m: m.id), ("status", lambda m: m.status), ("problem", lambda m: m.detail)])
    table("Equivalent (not run, not counted)", by("equivalent"), [("id", lambda m: m.id), ("file", lambda m: m.file), ("reason", lambda m: m.equivalent)])
    table(
        "Killed",
        by("killed") + by("timeout"),
        [("id", lambda m: m.id), ("s", lambda m: f"{m.seconds:.0f}"), ("caught by", lambda m: m.detail if m.status == "killed" else f"TIMEOUT {m.detail}")],
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", type=Path, default=HERE / "mutants.toml", help="the mutant list (TOML)")
    ap.add_argument("--only", action="append", default=[], help="run this mutant id (repeatable)")
    ap.add_argument("--file", action="append", default=[], help="run the mutants of this source file (repeatable)")
    ap.add_argument("--tests", nargs="+", help="run every mutant against these test files instead of its own")
    ap.add_argument("--exclude", action="append", default=[], help="drop this test file from every mutant's tests (repeatable)")
    ap.add_argument("--min", type=float, default=0.9, help="lowest acceptable kill rate (default 0.9)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (default 300)")
    ap.add_argument("--report", type=Path, default=HERE / "report.md", help="where to write the report ('-': print only)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)

    mutants = load(args.list)
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in args.only]
    if args.file:
        mutants = [m for m in mutants if m.file in args.file]
    for m in mutants:
        if args.tests:
            m.tests = list(args.tests)
        m.tests = [t for t in m.tests if t.split("::")[0] not in args.exclude]
        check(m)
        if m.status == "pending" and m.equivalent:
            m.status = "equivalent"
    todo = [m for m in mutants if m.status == "pending"]
    for m in mutants:
        if m.status in ("stale", "error"):
            print(f"{m.status.upper():9} {m.id}: {m.detail}", flush=True)
    print(f"{len(todo)} mutants to run ({len(mutants) - len(todo)} stale, broken or equivalent), {args.workers} workers", flush=True)

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` ends the run like Ctrl-C: tests ended, copies removed
    aborted = [False]
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="toymesa-mutate-"))
    baseline = "Unmutated tests: not run (--no-baseline)."
    try:
        copies: queue.Queue[Path] = queue.Queue()
        for w in range(max(1, min(args.workers, len(todo) or 1))):
            copy = make_copy(tmp / f"w{w}")
            print(f"worker {w}: {copy}, import toymesa -> {verify_import(copy, args.python)}", flush=True)
            copies.put(copy)
        if todo and not args.no_baseline:
            # every selected test path, unmutated, split over the workers: a failing test would "kill" every mutant
            union = list(dict.fromkeys(t for m in todo for t in m.tests))
            parts = [p for p in (union[i :: copies.qsize()] for i in range(copies.qsize())) if p]
            runs = _parallel(lambda pc: run_pytest(pc[1], pc[0], args.python, max(args.timeout, 600)), list(zip(parts, list(copies.queue), strict=False)))
            dt = time.perf_counter() - t0
            failed = [f"{o} {d}" for o, d, _ in runs if o != "passed"]
            print(f"baseline (unmutated, {len(union)} test paths): {'passed' if not failed else failed} in {dt:.0f} s", flush=True)
            if failed:
                print("the unmutated tests do not pass: every mutant would look killed; fix the tests first", file=sys.stderr)
                return 1
            baseline = f"Unmutated tests passed in {dt:.0f} s ({len(union)} test paths)."
        lock, done = threading.Lock(), [0]

        def work(m: Mutant) -> None:
            copy = copies.get()
            try:
                mutate_and_run(m, copy, args.python, args.timeout)
            finally:
                copies.put(copy)
            if aborted[0]:
                return
            with lock:
                done[0] += 1
                print(f"[{done[0]:3}/{len(todo)}] {m.status.upper():8} {m.id:40} {m.seconds:5.0f} s  {m.detail}", flush=True)

        _parallel(work, todo, args.workers)
    except KeyboardInterrupt:
        aborted[0] = True
        print("\ninterrupted: ending the running tests", file=sys.stderr)
        return 130
    finally:
        _kill_all()  # nothing is left running, whatever happened
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t0

    text = report(mutants, args, wall, baseline)
    if str(args.report) != "-":
        args.report.write_text(text + "\n")
    print("\n" + text)
    killed, survived, r = rate(mutants)
    bad = [m for m in mutants if m.status in ("stale", "error")]
    if bad:
        print(f"\n{len(bad)} stale or broken entries in {args.list}", file=sys.stderr)
    if killed + survived and r < args.min:
        print(f"\nkill rate {r:.0%} is below --min {args.min:.0%}", file=sys.stderr)
    return 1 if bad or (killed + survived and r < args.min) else 0


if __name__ == "__main__":
    sys.exit(main())
