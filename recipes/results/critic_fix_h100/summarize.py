"""The critic fix on the H100 sentiment protocol: the runs in before/ (critic = value head on the
frozen base, its LoRA adapter never trained) against those in after/ (LoRA adapter + head), laid out
as <variant>/seed-<k>/metrics.jsonl. Prints a markdown table and writes explained_variance.png.

    python recipes/results/critic_fix_h100/summarize.py recipes/results/critic_fix_h100

Reward at K nats: the mean reward of the 5 steps centred on the first step whose kl/ref reaches K,
then the mean over seeds ("–" where a seed never reaches K).
"""

import argparse
import statistics
from pathlib import Path

from trpo_rlhf.experiments.comparison import reward_at_kl
from trpo_rlhf.metrics import read_metrics

VARIANTS = {"trpo": "TRPO default (10 CG iterations)", "trpo_cg3": "TRPO cg_iters 3", "ppo": "PPO (ours), lr 1e-3"}


def summary(folder: Path, variant: str) -> dict | None:
    seeds = [read_metrics(p) for p in sorted((folder / variant).glob("seed-*/metrics.jsonl"))]
    if not seeds:
        return None

    def over_seeds(fn):
        values = [fn(rows) for rows in seeds]
        return None if any(v is None for v in values) else statistics.mean(values)

    return {
        "seeds": len(seeds),
        "explained_variance_all": over_seeds(lambda rows: statistics.mean(r["value/explained_variance"] for r in rows[1:])),
        "explained_variance_last10": over_seeds(lambda rows: statistics.mean(r["value/explained_variance"] for r in rows[-10:])),
        "value_loss_last10": over_seeds(lambda rows: statistics.mean(r["value/loss"] for r in rows[-10:])),
        "reward_mean_all": over_seeds(lambda rows: statistics.mean(r["reward/mean"] for r in rows)),
        "reward_last10": over_seeds(lambda rows: statistics.mean(r["reward/mean"] for r in rows[-10:])),
        "kl_ref_last10": over_seeds(lambda rows: statistics.mean(r["kl/ref"] for r in rows[-10:])),
        "reward_at_4": over_seeds(lambda rows: reward_at_kl(rows, 4.0)),
        "reward_at_6": over_seeds(lambda rows: reward_at_kl(rows, 6.0)),
        "value_update_s": over_seeds(lambda rows: statistics.mean(r["time/value_update"] for r in rows)),
        "entropy_first": over_seeds(lambda rows: rows[0]["policy/entropy"]),
        "entropy_last": over_seeds(lambda rows: rows[-1]["policy/entropy"]),
    }


def cell(value, spec=".3f"):
    return "–" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    before, after = args.folder / "before", args.folder / "after"
    print("| variant | critic | explained variance, steps 2–50 | last 10 steps | value loss, last 10 | mean reward, 1–50 "
          "| reward, 41–50 | kl/ref, 41–50 | reward @ 4 nats | @ 6 nats | entropy step 1 → 50 | value update s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, label in VARIANTS.items():
        for name, folder in (("head only (before)", before), ("LoRA + head (after)", after)):
            s = summary(folder, variant)
            if not s:
                continue
            print(f"| {label} | {name} | {cell(s['explained_variance_all'])} | {cell(s['explained_variance_last10'])} "
                  f"| {cell(s['value_loss_last10'], '.4f')} | {cell(s['reward_mean_all'])} | {cell(s['reward_last10'])} "
                  f"| {cell(s['kl_ref_last10'], '.2f')} | {cell(s['reward_at_4'])} | {cell(s['reward_at_6'])} "
                  f"| {cell(s['entropy_first'], '.2f')} → {cell(s['entropy_last'], '.2f')} | {cell(s['value_update_s'], '.2f')} |")
    plot(before, after, args.folder / "explained_variance.png")


def plot(before: Path, after: Path, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trpo_rlhf.experiments.plotting import running_mean, save_figure

    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(5 * len(VARIANTS), 3.8), sharey=True)
    for ax, (variant, label) in zip(axes, VARIANTS.items()):
        for name, folder, color in (("head only (before)", before, "tab:gray"), ("LoRA + head (after)", after, "tab:blue")):
            seeds = [read_metrics(p) for p in sorted((folder / variant).glob("seed-*/metrics.jsonl"))]
            steps = [r["step"] for r in seeds[0]]
            mean = [statistics.mean(rows[i]["value/explained_variance"] for rows in seeds) for i in range(len(steps))]
            ax.plot(steps, running_mean(mean, 5), color=color, linewidth=2, label=f"{name}, mean of {len(seeds)} seeds")
        ax.set(title=label, xlabel="step", ylabel="explained variance (running mean of 5)")
        ax.legend(fontsize=8)
    save_figure(fig, axes, output, title="Critic fit on the sentiment task (H100, batch 32, 24 tokens)")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
