"""loss.png: the training loss per step and its moving average (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over at most ``window`` values: m_t = mean(v_{max(0,t-w+1)..t})."""
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(losses: Sequence[float], path: Path, title: str) -> None:
    """Write the loss curve to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    window = max(1, len(losses) // 20)
    ax.plot(steps, moving_average(losses, window), lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
