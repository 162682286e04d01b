"""Each seed's mean reward over its 16 steps for the LoRA adapter on v_proj alone and for the
same update on the default adapter (q_proj and v_proj), and their paired difference over seeds
(mean ± standard error): seed k of both runs samples the same prompts at every step.

    python recipes/results/frontier_proxy_cpu/adapter_v_proj/differences.py
"""

import statistics
from pathlib import Path

from trpo_rlhf.metrics import read_metrics

HERE = Path(__file__).resolve().parent
# (the v_proj runs, the default adapter's runs of the same update)
PAIRS = {
    "TRPO": (HERE / "trpo_v", HERE.parent / "trpo_mom05"),
    "PPO (ours)": (HERE / "ppo_v", HERE.parent / "ppo_top_critic"),
}


def mean_reward(run: Path) -> float | None:
    rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    return statistics.mean(row["reward/mean"] for row in rows) if len(rows) == 16 else None


print(
    "update | seeds | mean reward, v_proj | default adapter | paired difference (± s.e.) | per seed, v_proj - default"
)
for name, (v_proj, default) in PAIRS.items():
    pairs = []
    for seed in range(9):
        a, b = mean_reward(v_proj / f"seed-{seed}"), mean_reward(default / f"seed-{seed}")
        if a is not None and b is not None:
            pairs.append((a, b))
    differences = [a - b for a, b in pairs]
    error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    print(
        f"{name} | {len(pairs)} | {statistics.mean(a for a, _ in pairs):.3f} | {statistics.mean(b for _, b in pairs):.3f} "
        f"| {statistics.mean(differences):+.3f} ± {error:.3f} | {', '.join(f'{d:+.3f}' for d in differences)}"
    )
