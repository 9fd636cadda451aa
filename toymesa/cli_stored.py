"""The commands that only read stored runs (registered by `toymesa.cli`): verify (recompute
and compare), claims (the ledger of published numbers), report, list."""

from __future__ import annotations

from pathlib import Path

import typer

from toymesa import tables


def verify(
    run: Path = typer.Argument(..., help="A run folder (meta.json, configs.json, chunks/)."),
    sample: int = typer.Option(3, min=1, help="Chunks to recompute, chosen at random."),
    all_: bool = typer.Option(False, "--all", help="Recompute every chunk."),
    seed: int = typer.Option(None, help="Seed of the random sample (default: drawn, and printed)."),
    any_code: bool = typer.Option(False, "--any-code", help="Compare even when the installed code differs from the run's (code digest)."),
    rtol: float = typer.Option(None, min=0, help="Compare within this relative tolerance even where bit-for-bit agreement is expected."),
    atol: float = typer.Option(1e-6, min=0, help="Absolute tolerance, with --rtol or on another machine type or library versions."),
):
    """Recompute chunks of a stored run from its configs and seeds, and compare them with the stored arrays.

    Bit for bit on the run's machine type and library versions, else within a stated tolerance;
    then re-derives results.csv, summary.csv, the verdicts and the ledger (claims.json) from the
    stored results. Prints one line per chunk (identical / within tolerance / different, with
    the largest difference); exit status 1 on any difference. Refuses when the installed code
    is not the code the run was computed with (--any-code compares anyway).
    """
    from toymesa import verify as verify_mod

    console = tables.console()
    record = verify_mod.verify(run, None if all_ else sample, seed=seed, any_code=any_code, rtol=rtol, atol=atol, echo=console.print)
    if not record["passed"]:
        raise typer.Exit(1)


def claims(
    run: Path = typer.Argument(None, help="A run folder, or an experiment's results folder, whose ledger to derive."),
    check: bool = typer.Option(False, "--check", help="Compare the derived ledger with the stored one instead of writing it."),
    out: Path = typer.Option(None, help="Ledger file to write or check (default RUN/claims.json)."),
    docs: bool = typer.Option(False, "--docs", help="Check every README's numbers against the ledgers (no RUN)."),
    fill: bool = typer.Option(False, "--fill", help="With --docs: rewrite the READMEs' cited numbers from the ledgers."),
):
    """The ledger of published numbers: derive RUN/claims.json from stored results, or check the READMEs against the ledgers.

    A README cites a number as <!--c LEDGER/ID-->text<!--/c--> (see toymesa.claims). Exit
    status 1 when a ledger or a README disagrees, naming each difference.
    """
    import json

    from toymesa import claims as claims_mod

    console = tables.console()
    if docs:
        if fill:
            for d in claims_mod.fill_docs():
                console.print(f"rewrote cited numbers in {d}")
        problems = claims_mod.check_docs()
        for p in problems:
            console.print(p, style="red", soft_wrap=True, emoji=False)  # "README.md:100:" stays text
        console.print(
            f"{len(problems)} problem(s) in {len(claims_mod.DOCS)} README(s)"
            if problems
            else f"every number in {len(claims_mod.DOCS)} README(s) cites its ledger"
        )
        if problems:
            raise typer.Exit(1)
        return
    if run is None:
        raise ValueError("give a run folder (toymesa claims RUN), or --docs to check the READMEs")
    dest = Path(run) / claims_mod.LEDGER if out is None else out
    if not check:
        claims_mod.write(run, dest)
        console.print(f"wrote {dest}")
        return
    if not dest.exists():
        raise FileNotFoundError(f"no ledger at {dest} to check; write one with `toymesa claims {run}`")
    diff = claims_mod.differences(json.loads(dest.read_text()), claims_mod.derive(run))
    for line in diff:
        console.print(line, style="red", soft_wrap=True, emoji=False)  # "README.md:100:" stays text
    console.print(
        f"{dest}: {len(diff)} difference(s) from the ledger re-derived from {run}" if diff else f"{dest} agrees with the ledger re-derived from {run}"
    )
    if diff:
        raise typer.Exit(1)


def report(
    results: Path = typer.Argument(None, help="A run folder, or a folder of run folders (default: every experiment's stored results; see `toymesa list`)."),
    out: Path = typer.Option(None, help="HTML file to write (default: report.html inside RESULTS, or results/report.html without RESULTS)."),
):
    """Write one HTML page with every run's hypotheses, verdicts, tables, figures and metadata.

    Also prints, per run, whether `toymesa verify` recomputed it, when, and with which code digest.
    """
    from toymesa import experiment
    from toymesa import report as report_mod
    from toymesa import verify as verify_mod

    if results is None:
        dirs = experiment.stored_runs(experiment.RESULTS)
        path = report_mod.write(dirs, experiment.RESULTS / "report.html" if out is None else out)
    else:
        dirs = experiment.result_dirs(results)
        path = report_mod.write(results, out)
    console = tables.console()
    for d in dirs:
        console.print(f"{d}: {verify_mod.status(d)}", soft_wrap=True)
    console.print(f"wrote {path}")


def list_cmd():
    """List the experiments (built-in demo and experiments/*/spec.toml) and their stored results."""
    from toymesa import experiment

    console = tables.console()
    for name, exp in experiment.discover().items():
        s = exp.spec()
        where = experiment.results_dir(name, experiment.RESULTS)
        state = experiment.run_state(where)
        shown = where or experiment.RESULTS / name
        if shown.is_absolute() and shown.is_relative_to(Path.cwd()):
            shown = shown.relative_to(Path.cwd())  # as the user would type it
        # soft_wrap: a long path stays one line (copyable), whatever the console width
        console.print(f"{name}  {len(s.cells())} cells x {len(s.seeds)} seeds  results: {shown} ({state})", style="bold", soft_wrap=True)
        console.print(f"    {' '.join(s.description.split())}")
