"""Terminal tables of the `toymesa` command: means with CIs per metric, split over several
tables when the columns do not fit the console, and hypothesis verdicts."""

from __future__ import annotations


def console():
    from rich.console import Console

    # markup off: cell ids, labels, paths and spec text are user text, and "[f1baef19f5]" would
    # be read as a style tag and vanish; styles are given explicitly (style=...) instead
    return Console(width=max(Console().width, 100), markup=False, highlight=False)


def fmt(mean, lo, hi, percent: bool = True) -> str:
    from toymesa.report import ci_text  # one formatter for the terminal and the HTML report

    return ci_text(mean, lo, hi, percent=percent, width=5)


def column_groups(widths: list[int], fixed: int, room: int) -> list[list[int]]:
    """Indices of columns (of `widths` characters each, 3 more for borders and padding) in
    consecutive groups whose tables fit `room` characters beside `fixed` ones; a column wider
    than the room alone gets a group of its own."""
    groups: list[list[int]] = [[]]
    used = fixed
    for i, w in enumerate(widths):
        if groups[-1] and used + w + 3 > room:
            groups.append([])
            used = fixed
        groups[-1].append(i)
        used += w + 3
    return groups


def print_table(console, title: str, summary, label: str, metrics: list[str], percent: bool = True):
    """Mean [CI] per metric, each on one line: when the columns do not fit the console's width
    they are split over several tables (the label column repeated) instead of folding every CI."""
    from rich.table import Table
    from rich.text import Text

    cells = {m: [fmt(r[m], r[f"{m}_lo"], r[f"{m}_hi"], percent) for _, r in summary.iterrows()] for m in metrics}
    labels = [str(v) for v in summary[label]]
    flagged = "nonfinite" in summary and summary["nonfinite"].fillna(0).gt(0).any()
    # a header may wrap at its spaces; a cell may not
    widths = [max([len(c) for c in cells[m]] + [len(w) for w in m.split("_")]) for m in metrics]
    fixed = 4 + max([len(x) for x in labels] + [len(label)]) + (13 if flagged else 0)
    groups = column_groups(widths, fixed, console.width)
    for k, group in enumerate(groups):
        table = Table(title=title if k == 0 else f"(continued, {k + 1}/{len(groups)})")
        table.add_column(label, justify="left", no_wrap=True)
        for i in group:
            table.add_column(metrics[i].replace("_", " "), justify="right", no_wrap=True, min_width=widths[i])
        if flagged:  # members excluded because their training went non-finite
            table.add_column("non-finite", justify="right", style="bold red")
        for j, name in enumerate(labels):
            extra = [str(int(summary["nonfinite"].iloc[j]))] if flagged else []
            table.add_row(Text(name), *(cells[metrics[i]][j] for i in group), *extra)
        console.print(table)


def print_verdicts(console, verdicts):
    from rich.table import Table
    from rich.text import Text

    if verdicts.empty:
        return
    table = Table(title="Hypotheses")
    cols = [c for c in ("id", "prediction", "rule", "verdict", "evidence") if c in verdicts]
    for col in cols:
        table.add_column(col, overflow="fold")
    for _, r in verdicts.iterrows():
        table.add_row(*(Text(str(r[c])) for c in cols))  # Text: brackets in evidence are not markup
    console.print(table)
