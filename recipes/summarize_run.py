"""Summarise a run's metrics.jsonl as markdown: reward and KL, trust-region statistics, and the
median seconds of each phase of a step.

    python recipes/summarize_run.py runs/trpo_sentiment [--plot runs/trpo_sentiment/training_curves.png]
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from trpo_rlhf.experiments.plotting import plot_training_curves
from trpo_rlhf.metrics import read_metrics

PHASES = [
    ("time/generate", "generate"),
    ("time/score", "score (reward)"),
    ("time/rollout_forward", "rollout forwards (old, ref log-probs, values)"),
    ("time/policy_gradient", "policy update: surrogate gradient"),
    ("time/policy_fvp_graph", "policy update: KL graph for the FVP"),
    ("time/policy_cg", "policy update: conjugate gradient"),
    ("time/policy_line_search", "policy update: line search"),
    ("time/policy_update", "policy update (total)"),
    ("time/value_update", "value update"),
    ("time/step", "whole step"),
]


def summarize(rows: list[dict], window: int = 5) -> str:
    window = max(1, min(window, len(rows) // 2 or 1))

    def median(key: str) -> float:
        # NaN (null in metrics.jsonl) where a step did not measure it, e.g. the CG residual of a
        # one-iteration step, which forms no Fisher-vector product.
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        return statistics.median(values) if values else math.nan

    first = statistics.mean(r["reward/mean"] for r in rows[:window])
    last = statistics.mean(r["reward/mean"] for r in rows[-window:])
    accepted = [r for r in rows if r.get("trpo/accepted")]
    lines = [
        f"| steps | reward, first {window} | reward, last {window} | KL to ref at the end | accepted updates |",
        "|---:|---:|---:|---:|---:|",
        f"| {len(rows)} | {first:.3f} | {last:.3f} | {rows[-1]['kl/ref']:.3f} | {len(accepted)}/{len(rows)} |",
        "",
    ]
    if accepted:
        ratios = [r["trpo/kl"] / r["trpo/kl_predicted"] for r in accepted if r["trpo/kl_predicted"] > 0]
        lines += [
            "| trust region | median |",
            "|---|---:|",
            f"| measured KL(π_old‖π_new) per completion | {statistics.median(r['trpo/kl'] for r in accepted):.4f} |",
            f"| measured / predicted (frac²·½sᵀFs) | {statistics.median(ratios):.2f} |",
            f"| step fraction | {statistics.median(r['trpo/step_frac'] for r in accepted):.2f} |",
            f"| CG iterations (FVPs per update) | {median('trpo/cg_iters'):.0f} ({median('trpo/fvp_count'):.0f}) |",
        ]
        if not math.isnan(median("trpo/cg_residual")):
            lines.append(f"| CG relative residual | {median('trpo/cg_residual'):.2f} |")
        lines.append("")
    lines += ["| phase | median s/step |", "|---|---:|"]
    lines += [f"| {label} | {median(key):.2f} |" for key, label in PHASES if any(key in r for r in rows)]
    lines.append(f"| peak memory (MB) | {max(r['memory/peak_mb'] for r in rows):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="Also write the training curves to this PNG.")
    args = parser.parse_args()
    rows = read_metrics(args.run_dir / "metrics.jsonl")
    print(summarize(rows))
    if args.plot:
        plot_training_curves(args.run_dir / "metrics.jsonl", args.plot)


if __name__ == "__main__":
    main()
