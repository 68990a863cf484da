"""Learning curves: a metric of training runs against the tokens they trained on, as a PNG and a Markdown table.

    python -m train.curves runs/medusa runs/eagle3 --field chain_tau --output curves.png --table curves.md

Reads each run's metrics.jsonl (one row per logged step, `tokens` = tokens trained on so far). --field names a
numeric field of the rows, an element of a list field (`head_acc[0]`), or `chain_tau`: 1 + sum over depths d < D of
prod_{j <= d} acc_j, the tau of a chain whose depth-j acceptance were the training accuracy of head / step j
(`head_acc`; the last one repeated beyond the heads a run has, D = --depth). It estimates from training batches;
a held-out tau logged in metrics.jsonl is the better curve where a run has one. The table says where each curve
flattens: the tokens after which it had reached 90 % and 95 % of its last value.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from cli.errors import ArgumentParser, run_main

LIST_ITEM = re.compile(r"^(\w+)\[(\d+)\]$")


def chain_tau(acc: list[float], depth: int) -> float:
    """1 + sum_{d < depth} prod_{j <= d} acc[min(j, len(acc) - 1)]."""
    tau, reach = 1.0, 1.0
    for d in range(depth):
        reach *= acc[min(d, len(acc) - 1)]
        tau += reach
    return tau


def value(row: dict, field: str, depth: int) -> float | None:
    if field == "chain_tau":
        return chain_tau(row["head_acc"], depth) if row.get("head_acc") else None
    item = LIST_ITEM.match(field)
    if item:
        values = row.get(item.group(1))
        return values[int(item.group(2))] if isinstance(values, list) and len(values) > int(item.group(2)) else None
    number = row.get(field)
    return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None


def curve(run: str | Path, field: str, depth: int = 5) -> list[tuple[int, float]]:
    """(tokens, value) of every metrics row of `run` that has both."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the output_dir of a training run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    points = [(r["tokens"], value(r, field, depth)) for r in rows if "tokens" in r]
    points = [(t, v) for t, v in points if v is not None]
    if not points:
        known = sorted({k for r in rows for k in r})
        raise ValueError(f"{path} has no rows with `tokens` and {field!r}; fields there: {', '.join(known)} "
                         f"(or chain_tau, name[i])")
    return points


def flattens(points: list[tuple[int, float]], share: float) -> int:
    """The tokens after which the curve stays at or above `share` of its last value."""
    last = points[-1][1]
    below = [t for t, v in points if v < share * last]
    return next((t for t, _ in points if not below or t > below[-1]), points[-1][0])


def table(curves: dict[str, list[tuple[int, float]]], field: str) -> str:
    lines = [f"| run | tokens | last {field} | 90 % of it after | 95 % of it after |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, points in curves.items():
        lines.append(f"| {name} | {points[-1][0]:,} | {points[-1][1]:.3f} | {flattens(points, 0.9):,} | "
                     f"{flattens(points, 0.95):,} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[tuple[int, float]]], field: str, output: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([t for t, _ in points], [v for _, v in points], label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(field)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def write_curves(runs: dict[str, str | Path], field: str, output: str | Path | None, table_path: str | Path | None,
                 depth: int = 5) -> str:
    """Plot and tabulate the runs (name -> run folder); returns the table."""
    curves = {name: curve(run, field, depth) for name, run in runs.items()}
    if output:
        plot(curves, field, output)
    text = table(curves, field)
    if table_path:
        Path(table_path).write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", help="training output folders (each with metrics.jsonl)")
    p.add_argument("--field", default="chain_tau", help="the metric: a field, name[i], or chain_tau")
    p.add_argument("--depth", type=int, default=5, help="chain_tau: draft depth")
    p.add_argument("--output", default="curves.png", help="the PNG to write")
    p.add_argument("--table", help="also write the Markdown table here")
    args = p.parse_args(argv)
    names = [Path(r).name for r in args.runs]
    runs = dict(zip(names if len(set(names)) == len(names) else args.runs, args.runs))
    try:
        print(write_curves(runs, args.field, args.output, args.table, args.depth), end="")
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))


if __name__ == "__main__":
    run_main(main)
