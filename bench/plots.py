"""PNG bar charts of the measured ratios (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def ratio_chart(path: Path, title: str, bars: dict[str, float], goals: dict[str, float]) -> None:
    """One bar per ratio; a tick mark at each bar's goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=90)
    names = list(bars)
    ax.bar(names, [bars[n] for n in names], color="#4477aa")
    for i, n in enumerate(names):
        ax.text(i, bars[n], f"{bars[n]:.2f}", ha="center", va="bottom", fontsize=8)
        if n in goals:
            ax.plot([i - 0.4, i + 0.4], [goals[n]] * 2, color="#cc3311", lw=2)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("ratio (red: goal)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def latency_chart(path: Path, rates: list[float], series: dict[str, list[float]]) -> None:
    """Latency percentiles (s) against the offered request rate (req/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    for name, values in series.items():
        ax.plot(rates, values, marker="o", label=name)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
