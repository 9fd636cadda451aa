"""The `toymesa` command."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="toymesa: falsifiable toy experiments on mesa-optimization.")


@app.callback()
def _root():
    """toymesa: falsifiable toy experiments on mesa-optimization."""


def _fmt(mean, lo, hi) -> str:
    return f"{100 * mean:5.1f}% [{100 * lo:5.1f}, {100 * hi:5.1f}]"


@app.command()
def demo(
    out: str = typer.Option("results/demo", help="Folder for results, summary and figure."),
    seeds: int = typer.Option(8, min=2, help="Seeds per arm (the CI is across seeds)."),
    steps: int = typer.Option(None, min=1, help="Training steps per arm (default: the config's)."),
    fresh: bool = typer.Option(False, help="Retrain arms even if finished results exist."),
):
    """Train single/latent backdoors in none/cot formats; print a table with 95% CIs; write a figure."""
    from rich.console import Console
    from rich.table import Table

    from toymesa import demo as demo_mod

    console = Console(width=max(Console().width, 100))
    summary, paths, seconds = demo_mod.main(out=out, n_seeds=seeds, steps=steps, fresh=fresh, echo=console.print)
    table = Table(title=f"Installed behaviour, mean over {seeds} seeds [95% bootstrap CI]")
    for col in ["arm", "triggered defection", "untriggered defection", "helpful accuracy"]:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for _, r in summary.iterrows():
        cells = [_fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"]) for m in demo_mod.METRICS]
        table.add_row(r["arm"], *cells)
    console.print(table)
    console.print(f"results: {out}/results.csv, {out}/summary.csv; figure: {', '.join(map(str, paths))}")
    console.print(f"total time {seconds:.0f}s")


def main():
    app()


if __name__ == "__main__":
    main()
