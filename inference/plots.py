"""PNG plots of a benchmark's results (inference.benchmark's results.json): tau and speedup per category per
method, acceptance per draft depth, and the accepted-length histogram. matplotlib, without a display."""
from __future__ import annotations

from pathlib import Path

PLOTS = {"tau_speedup_per_category.png": "τ and speedup per category",
         "acceptance_by_depth.png": "acceptance per draft depth",
         "accept_length_histogram.png": "accepted-length histogram"}


def write_plots(results: dict, folder: Path) -> dict[str, str]:
    """Write every plot into `folder`; returns file name -> title."""
    import matplotlib

    matplotlib.use("Agg")
    methods = results["methods"]
    title = f"{results['setup']['target']} on {results['setup']['questions']}"
    per_category(methods, folder / "tau_speedup_per_category.png", title)
    loops = {n: r for n, r in methods.items() if r["overall"]["verify_steps"]}  # draftsmith's loops report steps
    acceptance_by_depth(loops, folder / "acceptance_by_depth.png", title)
    accept_lengths(loops, folder / "accept_length_histogram.png", title)
    return dict(PLOTS)


def per_category(methods: dict, path: Path, title: str) -> None:
    """Two panels of grouped bars, tau and speedup over plain decoding, a bar per method in each category."""
    import matplotlib.pyplot as plt

    names = [n for n in methods if n != "plain"]
    categories = [*methods["plain"]["per_category"], "overall"]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(categories) * max(1, len(names)) ** 0.5) + 2, 7),
                             sharex=True)
    width = 0.8 / max(1, len(names))
    for ax, key, label in zip(axes, ("tau", "speedup"), ("τ (tokens per target forward)", "speedup over plain")):
        for i, name in enumerate(names):
            values = [(methods[name]["overall"] if c == "overall" else methods[name]["per_category"][c])[key]
                      for c in categories]
            ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(categories))], values, width,
                   label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
    axes[0].set_title(title)
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[1].set_xticks(range(len(categories)), categories, rotation=45, ha="right")
    _save(fig, path)


def acceptance_by_depth(methods: dict, path: Path, title: str) -> None:
    """Per drafter: the fraction of verify steps that accepted at least k drafted tokens, k = 1, 2, ..."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in methods.items():
        acc = r["overall"]["acceptance_by_depth"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=name)
    ax.set_xlabel("draft depth k")
    ax.set_ylabel("verify steps accepting ≥ k drafted tokens")
    ax.set_ylim(0, 1)
    _finish(ax, methods, title)
    _save(fig, path)


def accept_lengths(methods: dict, path: Path, title: str) -> None:
    """Per drafter: the share of verify steps that accepted n drafted tokens."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(methods))
    for i, (name, r) in enumerate(methods.items()):
        hist = r["overall"]["accept_length_histogram"]
        steps = sum(hist.values())
        ax.bar([int(n) + (i - (len(methods) - 1) / 2) * width for n in hist], [c / steps for c in hist.values()],
               width, label=name)
    ax.set_xlabel("drafted tokens accepted in a verify step")
    ax.set_ylabel("share of verify steps")
    _finish(ax, methods, title)
    _save(fig, path)


def _finish(ax, methods: dict, title: str) -> None:
    ax.set_title(title)
    if methods:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no drafter in this benchmark", ha="center", va="center", transform=ax.transAxes)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
