"""The table in README.md and frontier.png: the runs here beside the same protocol's runs in
../critic_fix_h100/after.

    python recipes/results/frontier_screen_h100/summarize.py

frontier.png: reward against KL to the reference. Each seed's curve (reward and kl/ref as running
means over 5 steps) is interpolated on a common KL grid up to where that seed stops; the thick line
is the mean over the seeds that reach that KL, the faint ones are the seeds.
"""

import statistics
from pathlib import Path

from trpo_rlhf.experiments.comparison import plot_frontier, reward_at_kl
from trpo_rlhf.metrics import read_metrics

HERE = Path(__file__).resolve().parent

FOLDERS = {name: HERE.parent / "critic_fix_h100" / "after" for name in ("trpo", "trpo_cg3", "ppo")}
FOLDERS |= {
    name: HERE
    for name in ("trpo_cg1", "trpo_ld0.01", "trpo_ld0.1", "trpo_ld1", "trpo_ld0.1_kl0.04", "ppo_lr3e-3", "trl_ppo")
}
PLOTTED = {
    "trpo": "TRPO, 10 CG iterations (default)",
    "trpo_cg3": "TRPO, 3 CG iterations",
    "trpo_cg1": "TRPO, 1 CG iteration",
    "trpo_ld0.1": "TRPO, logit damping 0.1",
    "ppo": "PPO (ours), lr 1e-3",
    "trl_ppo": "PPO (TRL 1.12), lr 1e-3",
}


def plot_frontiers(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0.0, 14.0, 141)
    for (variant, label), color in zip(PLOTTED.items(), plt.cm.tab10.colors):
        seeds = [read_metrics(p) for p in sorted((FOLDERS[variant] / variant).glob("seed-*/metrics.jsonl"))]
        plot_frontier(ax, seeds, grid, color, label, seed_alpha=0.2)
    ax.set_xlabel("KL to the reference (nats per completion)")
    ax.set_ylabel("reward (VADER), running mean of 5 steps")
    ax.set_title("Embedded sentiment, one H100: 50 steps x 32 prompts, 3 seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    print("| variant | r@2 | r@4 | r@6 | mean reward, 50 steps | reward, last 10 | kl/ref end | entropy end "
          "| update KL median | update KL max | accepted |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, folder in FOLDERS.items():
        seeds = [read_metrics(p) for p in sorted((folder / variant).glob("seed-*/metrics.jsonl"))]

        def over_seeds(fn):
            values = [fn(rows) for rows in seeds]
            return "–" if any(v is None for v in values) else f"{statistics.mean(values):.3f}"

        update_kl = [r.get("trpo/kl", r.get("ppo/kl")) for rows in seeds for r in rows]
        accepted = [r.get("trpo/accepted", 1.0) for rows in seeds for r in rows]
        cells = [
            variant,
            *(over_seeds(lambda rows, k=k: reward_at_kl(rows, k)) for k in (2.0, 4.0, 6.0)),
            over_seeds(lambda rows: statistics.mean(r["reward/mean"] for r in rows)),
            over_seeds(lambda rows: statistics.mean(r["reward/mean"] for r in rows[-10:])),
            over_seeds(lambda rows: statistics.mean(r["kl/ref"] for r in rows[-5:])),
            over_seeds(lambda rows: rows[-1]["policy/entropy"]),
            f"{statistics.median(update_kl):.4f}",
            f"{max(update_kl):.4f}",
            f"{statistics.mean(accepted):.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    plot_frontiers(HERE / "frontier.png")


if __name__ == "__main__":
    main()
