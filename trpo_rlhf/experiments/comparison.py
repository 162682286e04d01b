"""Summaries, table and plot for comparing algorithms run over several seeds.

>>> rows = {"trpo": [[{"step": 1, "reward/mean": 0.0, "kl/ref": 0.0, "trpo/kl": 0.01, "time/step": 1.0,
...                    "time/policy_update": 0.5, "memory/peak_mb": 100.0},
...                   {"step": 2, "reward/mean": 1.0, "kl/ref": 0.5, "trpo/kl": 0.03, "time/step": 1.0,
...                    "time/policy_update": 0.5, "memory/peak_mb": 120.0}]]}
>>> summary = summarize_runs(rows, kl_target=0.02)["trpo"]
>>> summary["final_reward_mean"], summary["kl_exceed_fraction"], summary["peak_memory_mb"]
(1.0, 0.5, 120.0)
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .plotting import save_figure

ALGORITHMS = ("trpo", "ppo", "trl_ppo")
LABELS = {"trpo": "TRPO (ours)", "ppo": "PPO (ours)", "trl_ppo": "PPO (TRL 1.12)"}
COLORS = {"trpo": "tab:blue", "ppo": "tab:orange", "trl_ppo": "tab:green"}
# The measured KL(pi_old || pi_new) of each update: exact over the vocabulary for ours, TRL's
# sampled-token approximation for TRL.
UPDATE_KL_KEY = {"trpo": "trpo/kl", "ppo": "ppo/kl", "trl_ppo": "ppo/kl"}


def _tail(rows: list[dict], fraction: float = 0.1) -> list[dict]:
    return rows[-max(1, math.ceil(fraction * len(rows))) :]


def summarize_runs(runs: dict[str, list[list[dict]]], kl_target: float) -> dict[str, dict]:
    """Per algorithm, from one metrics list per seed: the final reward (mean of the last 10 % of
    steps) as mean and std over seeds, the KL to the reference at the end (same window, mean over
    seeds), the fraction of all updates whose measured KL exceeded `kl_target`, mean seconds per
    step and per policy update (None where the algorithm does not time it separately), peak memory."""
    results = {}
    for algorithm, seeds in runs.items():
        finals = [statistics.mean(r["reward/mean"] for r in _tail(rows)) for rows in seeds]
        kl_end = [statistics.mean(r["kl/ref"] for r in _tail(rows)) for rows in seeds]
        update_kl = [r[UPDATE_KL_KEY[algorithm]] for rows in seeds for r in rows if UPDATE_KL_KEY[algorithm] in r]
        step_s = [r["time/step"] for rows in seeds for r in rows]
        policy_s = [r["time/policy_update"] for rows in seeds for r in rows if "time/policy_update" in r]
        results[algorithm] = {
            "final_reward_mean": statistics.mean(finals),
            "final_reward_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "kl_ref_final": statistics.mean(kl_end),
            "kl_exceed_fraction": sum(kl > kl_target for kl in update_kl) / len(update_kl) if update_kl else None,
            "seconds_per_step": statistics.mean(step_s),
            "policy_update_seconds_per_step": statistics.mean(policy_s) if policy_s else None,
            "peak_memory_mb": max(r["memory/peak_mb"] for rows in seeds for r in rows),
            "seeds": len(seeds),
            "steps": min(len(rows) for rows in seeds),
        }
    return results


def markdown_table(results: dict[str, dict], kl_target: float) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"| algorithm | final reward (mean ± std over seeds) | KL to ref at the end | updates with KL > {kl_target:g} "
        "| s/step | policy update s/step | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for algorithm, r in results.items():
        lines.append(
            f"| {LABELS.get(algorithm, algorithm)} | {r['final_reward_mean']:.3f} ± {r['final_reward_std']:.3f} | "
            f"{r['kl_ref_final']:.3f} | {fmt(r['kl_exceed_fraction'], '.0%')} | {r['seconds_per_step']:.2f} | "
            f"{fmt(r['policy_update_seconds_per_step'], '.2f')} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot_comparison(runs: dict[str, list[list[dict]]], output_path: str | Path, title: str | None = None) -> Path:
    """Reward vs step and reward vs KL to the reference: mean over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_kl) = plt.subplots(1, 2, figsize=(12, 4.2))
    for algorithm, seeds in runs.items():
        n = min(len(rows) for rows in seeds)
        steps = list(range(1, n + 1))
        rewards = [[rows[i]["reward/mean"] for rows in seeds] for i in range(n)]
        kls = [statistics.mean(rows[i]["kl/ref"] for rows in seeds) for i in range(n)]
        mean = [statistics.mean(r) for r in rewards]
        color, label = COLORS.get(algorithm), f"{LABELS.get(algorithm, algorithm)} ({len(seeds)} seeds)"
        by_step.plot(steps, mean, color=color, label=label)
        by_step.fill_between(steps, [min(r) for r in rewards], [max(r) for r in rewards], color=color, alpha=0.2)
        by_kl.plot(kls, mean, "o-", color=color, markersize=3, label=label)
    by_step.set(xlabel="step", ylabel="reward (batch mean)", title="reward vs step (mean, min-max over seeds)")
    by_kl.set(
        xlabel="KL to the reference (nats per completion)",
        ylabel="reward (batch mean)",
        title="reward vs KL to the reference",
    )
    for ax in (by_step, by_kl):
        ax.legend()
    return save_figure(fig, (by_step, by_kl), output_path, title)
