"""Learning curves from metrics.jsonl.

>>> from trpo_rlhf.experiments.plotting import plot_training_curves
>>> plot_training_curves("runs/x/metrics.jsonl", "runs/x/training_curves.png")   # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

from ..metrics import read_metrics


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_training_curves(
    metrics_path: str | Path, output_path: str | Path, title: str | None = None, smooth: int = 5
) -> Path:
    """Reward (batch mean, its running mean over `smooth` steps, and a +-1 std band), KL to the
    reference, and the trust-region KL of each update (measured vs predicted) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    mean = [r["reward/mean"] for r in rows]
    std = [r["reward/std"] for r in rows]
    axes[0].plot(steps, mean, color="tab:blue", alpha=0.5, label="batch mean")
    axes[0].plot(steps, running_mean(mean, smooth), color="tab:blue", linewidth=2.5, label=f"running mean of {smooth}")
    axes[0].fill_between(
        steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color="tab:blue", alpha=0.15
    )
    axes[0].legend()
    axes[0].set(xlabel="step", ylabel="reward", title="reward (mean ± std over the batch)")
    axes[1].plot(steps, [r["kl/ref"] for r in rows], color="tab:red")
    axes[1].set(xlabel="step", ylabel="nats per completion", title="KL to the reference")
    if any("trpo/kl" in r for r in rows):
        # A step rejected for a non-finite value has no trust-region keys: a gap in the curve.
        axes[2].plot(steps, [r.get("trpo/kl", math.nan) for r in rows], "o-", label="measured KL(π_old‖π_new)")
        axes[2].plot(steps, [r.get("trpo/kl_predicted", math.nan) for r in rows], "x--", label="predicted frac²·½sᵀFs")
        axes[2].set(xlabel="step", ylabel="nats per completion", title="trust-region step")
        axes[2].legend()
    else:
        axes[2].axis("off")
    return save_figure(fig, axes, output_path, title)


def save_figure(fig, axes, output_path: str | Path, title: str | None = None) -> Path:
    """Grid on every axis, the title, a tight layout; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=110)
    plt.close(fig)
    return output_path
