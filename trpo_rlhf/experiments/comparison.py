"""Summaries, table and plot for comparing algorithms run over several seeds.

>>> rows = {"trpo": [[{"step": 1, "reward/mean": 0.0, "kl/ref": 0.0, "trpo/kl": 0.01, "time/step": 1.0,
...                    "time/policy_update": 0.5, "memory/peak_mb": 100.0},
...                   {"step": 2, "reward/mean": 1.0, "kl/ref": 0.5, "trpo/kl": 0.03, "time/step": 1.0,
...                    "time/policy_update": 0.5, "memory/peak_mb": 120.0}]]}
>>> summary = summarize_runs(rows, kl_target=0.02)["trpo"]
>>> summary["final_reward_mean"], summary["kl_exceed_fraction"], summary["peak_memory_mb"]
(1.0, 0.5, 120.0)
>>> summary["frontier_kl"], summary["frontier_auc"]["mean"]     # its mean reward over KL 0..0.25
(0.25, 0.25)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from .plotting import running_mean, save_figure

ALGORITHMS = ("trpo", "ppo", "trl_ppo", "trl_grpo")
LABELS = {"trpo": "TRPO (ours)", "ppo": "PPO (ours)", "trl_ppo": "PPO (TRL 1.12)", "trl_grpo": "GRPO (TRL 1.12)"}
COLORS = {"trpo": "tab:blue", "ppo": "tab:orange", "trl_ppo": "tab:green", "trl_grpo": "tab:red"}
# The measured KL(pi_old || pi_new) of each update: exact over the vocabulary for ours, TRL's
# sampled-token approximation for TRL's PPO; TRL's GRPO logs none.
UPDATE_KL_KEY = {"trpo": "trpo/kl", "ppo": "ppo/kl", "trl_ppo": "ppo/kl"}


def _tail(rows: list[dict], fraction: float = 0.1) -> list[dict]:
    return rows[-max(1, math.ceil(fraction * len(rows))) :]


# --------------------------------------------------------------------------------------------
# The reward-vs-KL-to-reference frontier (Rafailov et al. 2023, Fig. 2, on this very task)
# --------------------------------------------------------------------------------------------
FRONTIER_NATS = (2.0, 4.0, 6.0)
FRONTIER_WINDOW = 5


def frontier_curve(rows: list[dict], window: int = FRONTIER_WINDOW) -> tuple[list[float], list[float]]:
    """(KL to the reference, reward) of one run as a curve: both as running means over `window`
    steps, the KL made non-decreasing (its running maximum), so the curve is a function of KL."""
    kl, reward = (
        running_mean([r["kl/ref"] for r in rows], window),
        running_mean([r["reward/mean"] for r in rows], window),
    )
    monotone, high = [], -math.inf
    for value in kl:
        high = max(high, value)
        monotone.append(high)
    return monotone, reward


def reward_at_kl(rows: list[dict], nats: float, window: int = FRONTIER_WINDOW) -> float | None:
    """The run's reward when its policy is `nats` from the reference: the mean reward of the
    `window` steps centred on the first step whose `kl/ref` reaches `nats` (None if none does)."""
    for i, row in enumerate(rows):
        if row["kl/ref"] >= nats:
            half = window // 2
            return statistics.mean(r["reward/mean"] for r in rows[max(0, i - half) : i + half + 1])
    return None


def frontier_auc(rows: list[dict], kl_max: float) -> float | None:
    """Area under the run's `frontier_curve` from 0 to `kl_max` nats, divided by `kl_max`: its mean
    reward over that range of KL (None if the run does not reach `kl_max`). Trapezoids on the
    curve's own points, the end point linearly interpolated."""
    kl, reward = frontier_curve(rows)
    if not kl or kl[-1] < kl_max or kl_max <= 0:
        return None
    points = [(0.0, reward[0])] + [(k, r) for k, r in zip(kl, reward) if 0.0 < k < kl_max]
    after = next(i for i, k in enumerate(kl) if k >= kl_max)
    before_kl, before_reward = (kl[after - 1], reward[after - 1]) if after > 0 else points[-1]
    span = kl[after] - before_kl
    end_reward = (
        reward[after] if span <= 0 else before_reward + (reward[after] - before_reward) * (kl_max - before_kl) / span
    )
    points.append((kl_max, end_reward))
    area = sum((k1 - k0) * (r0 + r1) / 2 for (k0, r0), (k1, r1) in zip(points, points[1:]))
    return area / kl_max


def common_kl(runs: dict[str, list[list[dict]]]) -> float:
    """The largest KL every run of every variant reaches on its `frontier_curve`: the range over
    which `frontier_auc` compares them."""
    return min(frontier_curve(rows)[0][-1] for seeds in runs.values() for rows in seeds)


def spread(values: list[float | None]) -> dict | None:
    """Mean, min and max over seeds; None unless every seed has a value."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def summarize_runs(
    runs: dict[str, list[list[dict]]],
    kl_target: float,
    algorithms: dict[str, str] | None = None,
    frontier_nats: Sequence[float] = FRONTIER_NATS,
) -> dict[str, dict]:
    """Per variant (an algorithm, or one of its settings), from one metrics list per seed: the
    final reward (mean of the last 10 % of steps) as mean and std over seeds, the KL to the
    reference at the end (same window, mean over seeds), the fraction of all updates whose
    measured KL exceeded `kl_target`, the median and largest `policy/kl_held_out` (the update's KL
    on prompts outside its batch; None where the runs did not measure it), mean seconds per step
    and per policy update (None where the algorithm does not time it separately), peak memory, and
    the frontier: at each of `frontier_nats` (2, 4 and 6 nats unless given) `reward_at_kl` and
    `frontier_auc_to_kl` (the mean reward from 0 to that KL), and `frontier_auc` up to
    `frontier_kl` (the KL every run reaches), each as mean, min and max over seeds (None where a
    seed does not reach it). `algorithms` maps a variant to its algorithm (default: the variant's
    name)."""
    algorithms = algorithms or {}
    kl_max = common_kl(runs)
    results = {}
    for variant, seeds in runs.items():
        algorithm = algorithms.get(variant, variant)
        finals = [statistics.mean(r["reward/mean"] for r in _tail(rows)) for rows in seeds]
        kl_end = [statistics.mean(r["kl/ref"] for r in _tail(rows)) for rows in seeds]
        update_kl_key = UPDATE_KL_KEY.get(algorithm)  # None: the algorithm logs no update KL
        update_kl = [r[update_kl_key] for rows in seeds for r in rows if update_kl_key in r]
        step_s = [r["time/step"] for rows in seeds for r in rows]
        policy_s = [r["time/policy_update"] for rows in seeds for r in rows if "time/policy_update" in r]
        held_out_kl = [
            r["policy/kl_held_out"] for rows in seeds for r in rows if r.get("policy/kl_held_out") is not None
        ]
        results[variant] = {
            "algorithm": algorithm,
            "final_reward_mean": statistics.mean(finals),
            "final_reward_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "mean_reward": statistics.mean(statistics.mean(r["reward/mean"] for r in rows) for rows in seeds),
            "kl_ref_final": statistics.mean(kl_end),
            "kl_exceed_fraction": sum(kl > kl_target for kl in update_kl) / len(update_kl) if update_kl else None,
            "held_out_kl": (
                {"median": statistics.median(held_out_kl), "max": max(held_out_kl)} if held_out_kl else None
            ),
            "reward_at_kl": {
                f"{nats:g}": spread([reward_at_kl(rows, nats) for rows in seeds]) for nats in frontier_nats
            },
            "frontier_auc_to_kl": {
                f"{nats:g}": spread([frontier_auc(rows, nats) for rows in seeds]) for nats in frontier_nats
            },
            "frontier_auc": spread([frontier_auc(rows, kl_max) for rows in seeds]),
            "frontier_kl": kl_max,
            "seconds_per_step": statistics.mean(step_s),
            "policy_update_seconds_per_step": statistics.mean(policy_s) if policy_s else None,
            "peak_memory_mb": max(r["memory/peak_mb"] for rows in seeds for r in rows),
            "seeds": len(seeds),
            "steps": min(len(rows) for rows in seeds),
        }
    return results


def best_variants(results: dict[str, dict]) -> dict[str, str]:
    """Per algorithm, its variant with the largest mean `frontier_auc` (the learning rate a
    frontier comparison should show, as Rafailov et al. 2023 show each method at its best)."""
    best: dict[str, str] = {}
    for variant, r in results.items():
        auc = (r["frontier_auc"] or {}).get("mean", -math.inf)
        current = best.get(r["algorithm"])
        if current is None or auc > (results[current]["frontier_auc"] or {}).get("mean", -math.inf):
            best[r["algorithm"]] = variant
    return best


def frontier_envelope(results: dict[str, dict]) -> dict[str, dict]:
    """Per algorithm, each method at its best at every point: `reward_at_kl` at each KL the results
    were summarized at (`summarize_runs`' `frontier_nats`) and `mean_reward`, each {"mean",
    "variant"} from the variant with the largest mean there (of those whose every seed reaches that
    KL; None where none does). This is the upper envelope of a
    method's runs, which Rafailov et al. 2023 (Fig. 2) draw as its frontier; `best_variants` picks
    one variant for the whole range instead.

    >>> at_kl = lambda at_2: {"2": {"mean": at_2}, "4": None}  # no seed reaches 4 nats
    >>> results = {"ppo_lr1e-3": {"algorithm": "ppo", "mean_reward": 0.3, "reward_at_kl": at_kl(0.4)},
    ...            "ppo_lr3e-3": {"algorithm": "ppo", "mean_reward": 0.5, "reward_at_kl": at_kl(0.2)}}
    >>> envelope = frontier_envelope(results)["ppo"]
    >>> envelope["reward_at_kl"]["2"], envelope["mean_reward"], envelope["reward_at_kl"]["4"]
    ({'mean': 0.4, 'variant': 'ppo_lr1e-3'}, {'mean': 0.5, 'variant': 'ppo_lr3e-3'}, None)
    """

    def best_of(variants: dict[str, dict], value_of) -> dict | None:
        scored = [(value, v) for v, r in variants.items() if (value := value_of(r)) is not None]
        if not scored:
            return None
        value, variant = max(scored, key=lambda pair: pair[0])
        return {"mean": value, "variant": variant}

    nats = frontier_nats_of(results)
    envelope = {}
    for algorithm in dict.fromkeys(r["algorithm"] for r in results.values()):
        own = {v: r for v, r in results.items() if r["algorithm"] == algorithm}
        envelope[algorithm] = {
            "reward_at_kl": {
                key: best_of(own, lambda r, key=key: (r["reward_at_kl"].get(key) or {}).get("mean")) for key in nats
            },
            "mean_reward": best_of(own, lambda r: r["mean_reward"]),
        }
    return envelope


def frontier_nats_of(results: dict[str, dict]) -> list[str]:
    """The KLs (as their keys, "0.5", "2") at which `summarize_runs` read the frontier, from its
    results or from their `frontier_envelope` (both keyed by `reward_at_kl`)."""
    return list(next(iter(results.values()))["reward_at_kl"]) if results else []


def nats_text(key: str) -> str:
    return f"{key} nat" if key == "1" else f"{key} nats"


def label(variant: str, algorithm: str) -> str:
    return (
        LABELS.get(algorithm, algorithm) if variant == algorithm else f"{LABELS.get(algorithm, algorithm)} [{variant}]"
    )


def markdown_table(results: dict[str, dict], kl_target: float) -> str:
    """One row per variant; the best variant of each algorithm (by `frontier_auc`) in bold when
    an algorithm has several."""

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    def frontier(value):
        return "–" if value is None else f"{value['mean']:.3f} ({value['min']:.3f}–{value['max']:.3f})"

    best = best_variants(results)
    several = {a for a in best if sum(r["algorithm"] == a for r in results.values()) > 1}
    kl_max = next(iter(results.values()))["frontier_kl"] if results else 0.0
    nats = frontier_nats_of(results)
    at_kl = " | ".join(f"reward @ {nats_text(n)}" for n in nats)
    to_kl = " | ".join(f"mean reward, 0–{nats_text(n)}" for n in nats)
    lines = [
        f"| variant | final reward (mean ± std over seeds) | mean reward | {at_kl} | {to_kl} "
        f"| frontier AUC, 0–{kl_max:.2f} nats "
        f"| KL to ref at the end | updates with KL > {kl_target:g} | update KL on held-out prompts, median (max) "
        "| s/step | policy update s/step | peak MB |",
        "|---|---:|---:|" + "---:|" * 2 * len(nats) + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, r in results.items():
        name = label(variant, r["algorithm"])
        if r["algorithm"] in several and best[r["algorithm"]] == variant:
            name = f"**{name}** (best)"
        cells = [
            name,
            f"{r['final_reward_mean']:.3f} ± {r['final_reward_std']:.3f}",
            f"{r['mean_reward']:.3f}",
            *(frontier(r["reward_at_kl"][n]) for n in nats),
            *(frontier(r["frontier_auc_to_kl"][n]) for n in nats),
            frontier(r["frontier_auc"]),
            f"{r['kl_ref_final']:.3f}",
            fmt(r["kl_exceed_fraction"], ".0%"),
            "n/a" if r["held_out_kl"] is None else f"{r['held_out_kl']['median']:.4f} ({r['held_out_kl']['max']:.4f})",
            f"{r['seconds_per_step']:.2f}",
            fmt(r["policy_update_seconds_per_step"], ".2f"),
            f"{r['peak_memory_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def envelope_table(envelope: dict[str, dict]) -> str:
    """One row per algorithm of a `frontier_envelope`, each cell the best reading and the variant
    it comes from."""

    def cell(best):
        return "–" if best is None else f"{best['mean']:.3f} ({best['variant']})"

    nats = frontier_nats_of(envelope)
    lines = [
        f"| at its best (each cell the best variant there) | {' | '.join(f'reward @ {nats_text(n)}' for n in nats)} "
        "| mean reward |",
        "|---|" + "---:|" * (len(nats) + 1),
    ]
    for algorithm, best in envelope.items():
        cells = [LABELS.get(algorithm, algorithm), *(cell(best["reward_at_kl"][n]) for n in nats)]
        lines.append("| " + " | ".join([*cells, cell(best["mean_reward"])]) + " |")
    return "\n".join(lines)


def plot_frontier(ax, seeds: list[list[dict]], grid, color, label: str, seed_alpha: float = 0.25) -> None:
    """One variant's frontier on `ax`: each seed's `frontier_curve` faint, and their mean on the KL
    `grid` (a numpy array) thick, where every seed has data."""
    import numpy as np

    curves = []
    for rows in seeds:
        kl, reward = frontier_curve(rows)
        ax.plot(kl, reward, color=color, alpha=seed_alpha, linewidth=0.8)
        curves.append(np.where(grid <= kl[-1], np.interp(grid, kl, reward), np.nan))
    curves = np.array(curves)
    reached = ~np.isnan(curves).any(axis=0)
    ax.plot(grid[reached], curves[:, reached].mean(axis=0), color=color, linewidth=2, label=label)


def plot_comparison(
    runs: dict[str, list[list[dict]]],
    output_path: str | Path,
    title: str | None = None,
    algorithms: dict[str, str] | None = None,
) -> Path:
    """Left: reward vs step, mean over seeds with a min-max band. Right: the frontier, reward vs
    KL to the reference: each seed's `frontier_curve` faint, their mean (on a common KL grid, where
    every seed has data) thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    algorithms = algorithms or {}
    fig, (by_step, by_kl) = plt.subplots(1, 2, figsize=(12, 4.2))
    palette = iter(plt.cm.tab10.colors[3:] * 3)  # the first three are the algorithms' own (COLORS)
    kl_top = max(frontier_curve(rows)[0][-1] for seeds in runs.values() for rows in seeds)
    grid = np.linspace(0.0, max(kl_top, 1e-9), 200)
    for variant, seeds in runs.items():
        algorithm = algorithms.get(variant, variant)
        color = COLORS.get(variant) or next(palette)
        name = f"{label(variant, algorithm)} ({len(seeds)} seeds)"
        n = min(len(rows) for rows in seeds)
        steps = list(range(1, n + 1))
        rewards = [[rows[i]["reward/mean"] for rows in seeds] for i in range(n)]
        by_step.plot(steps, [statistics.mean(r) for r in rewards], color=color, label=name)
        by_step.fill_between(steps, [min(r) for r in rewards], [max(r) for r in rewards], color=color, alpha=0.2)
        plot_frontier(by_kl, seeds, grid, color, name)
    by_step.set(xlabel="step", ylabel="reward (batch mean)", title="reward vs step (mean, min-max over seeds)")
    by_kl.set(
        xlabel="KL to the reference (nats per completion)",
        ylabel=f"reward, running mean of {FRONTIER_WINDOW} steps",
        title="the frontier: reward vs KL to the reference",
    )
    for ax in (by_step, by_kl):
        ax.legend(fontsize=8)
    return save_figure(fig, (by_step, by_kl), output_path, title)
