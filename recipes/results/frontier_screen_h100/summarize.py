"""The table in README.md: the runs here beside the same protocol's runs in ../critic_fix_h100/after.

    python recipes/results/frontier_screen_h100/summarize.py
"""

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "critic_fix_h100"))
from summarize import reward_at_kl  # noqa: E402

from trpo_rlhf.metrics import read_metrics  # noqa: E402

FOLDERS = {name: HERE.parent / "critic_fix_h100" / "after" for name in ("trpo", "trpo_cg3", "ppo")}
FOLDERS |= {name: HERE for name in ("trpo_cg1", "trpo_ld0.01", "trpo_ld0.1", "trpo_ld1", "ppo_lr3e-3", "trpo_ld0.1_kl0.04")}


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


if __name__ == "__main__":
    main()
