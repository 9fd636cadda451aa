"""Where a result came from: the code that computed it, the commit, the library versions.

`code_digest()` hashes the source of every module that determines the numbers a sweep stores
(configs, token worlds, model, training, safety training, evaluation, the runner): chunk and
install cache keys carry it, so results computed by other code are never reused or mixed in.
Modules that only read, summarise or draw stored results (listed in `READERS`) are left out,
so editing a figure or a table does not invalidate finished runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import toymesa

PACKAGE = Path(toymesa.__file__).resolve().parent
READERS = frozenset(
    {
        "bench.py",
        "claims.py",
        "cli.py",
        "cli_stored.py",
        "demo.py",
        "demo_claims.py",
        "experiment.py",
        "parts.py",
        "plot.py",
        "prereg.py",
        "provenance.py",
        "report.py",
        "runs.py",
        "show.py",
        "spec.py",
        "spec_fields.py",
        "stats.py",
        "torch_baseline.py",
        "verify.py",
    }
)  # spec*.py and demo.py only build Configs, which the cache keys hold themselves; show.py only decodes; claims, demo_claims, verify, report read stored runs
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "pandas")


def file_digest(path) -> str | None:
    """First 12 hex digits of sha256 of a file's bytes (None when there is no such file)."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else None


@functools.cache
def code_digest() -> str:
    """First 12 hex digits of sha256 over (path, source) of every computing module of toymesa."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in READERS:
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_commit() -> str | None:
    """HEAD of the repository holding the package, with "+dirty" for uncommitted tracked
    changes; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    """The machine type results were computed on: architecture, CPU model, CPU count. Two runs
    agree bit for bit only on the same type (XLA's CPU code is compiled for the host's
    instruction set) with the same library versions (`versions`)."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count()}


def versions() -> dict:
    """Python, toymesa and the numerical libraries' versions."""
    out = {"python": platform.python_version(), "toymesa": toymesa.__version__}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out
