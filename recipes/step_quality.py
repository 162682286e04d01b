"""What does a cheaper trust-region update cost in step quality? The same TRPO update, with fewer
conjugate-gradient iterations or a subsampled Fisher, on the batches of one real training run.

    python recipes/step_quality.py --model embedded --probe_steps 1 4 8 --run_cg_iters 10 --run_max_kl 0.02 \\
        --run_cg_preconditioner none --cg_iters 1 2 3 4 6 15 --fvp_subsample 0.5 0.25 --output recipes/results/step_quality_cpu
    python recipes/step_quality.py --model tiny --probe_steps 1 2 --cg_iters 3 10    # a quick look

TRPO trains with its defaults (`TRPOConfig`), but `--run_cg_iters` CG iterations, δ =
`--run_max_kl` and `--run_cg_preconditioner`, for max(--probe_steps) steps. On each probe step, before the run's own update,
every variant runs its policy update on that step's batch from the same parameters: `cg_iters` =
each of --cg_iters with the whole batch's Fisher, and `fvp_subsample` = each of --fvp_subsample
at the run's cg_iters; the run's own setting is always probed, first. The parameters and the minibatch generator are restored bitwise after each, so the run is
the one an unprobed run would be.

What a step buys is the surrogate gain L(theta_new) - L(theta_old) at a measured KL inside the
trust region: for the same KL, a better solve of (F + cI) x = g buys more. Writes probes.jsonl (one
line per variant and step) and summary.md (per variant: median update seconds, mean surrogate gain
and its mean ratio to the run's own update's on the same batch, median measured KL and line-search points).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments import task_for_model
from trpo_rlhf.experiments.cli import add_config_flag, apply_config_file
from trpo_rlhf.metrics import append_jsonl
from trpo_rlhf.profiling import stopwatch
from trpo_rlhf.trust_region import restore, snapshot

DEFAULT = TRPOConfig()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="embedded", help="'tiny', 'embedded' (SmolLM2-135M, offline), or a hub id / local path."
    )
    parser.add_argument("--batch_size", type=int, default=DEFAULT.batch_size)
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT.max_new_tokens)
    parser.add_argument("--probe_steps", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--run_cg_iters", type=int, default=DEFAULT.cg_iters, help="The run's own CG iterations.")
    parser.add_argument("--run_max_kl", type=float, default=DEFAULT.max_kl, help="The run's (and every probe's) delta.")
    parser.add_argument(
        "--run_cg_preconditioner",
        default=DEFAULT.cg_preconditioner,
        choices=["none", "gradient_rms"],
        help="The run's (and every probe's) CG preconditioner.",
    )
    parser.add_argument("--cg_iters", type=int, nargs="*", default=[2, 3, 6, 10, 15])
    parser.add_argument("--fvp_subsample", type=float, nargs="*", default=[0.5, 0.25])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="Directory for probes.jsonl and summary.md.")
    add_config_flag(parser)
    args = parser.parse_args(apply_config_file(parser, argv))
    if min(args.probe_steps) < 1:
        parser.error(f"--probe_steps {args.probe_steps}: steps count from 1.")
    return args


def variants(cg_iters: list[int], fvp_subsample: list[float], run_cg_iters: int = DEFAULT.cg_iters) -> list[dict]:
    """The run's own setting first, then each cheaper (or dearer) one, one field changed at a time."""
    chosen = [{"cg_iters": run_cg_iters, "fvp_subsample": DEFAULT.fvp_subsample}]
    chosen += [{"cg_iters": k, "fvp_subsample": DEFAULT.fvp_subsample} for k in cg_iters]
    chosen += [{"cg_iters": run_cg_iters, "fvp_subsample": s} for s in fvp_subsample]
    unique = []
    for v in chosen:
        if v not in unique:
            unique.append(v)
    return unique


class ProbingTRPOTrainer(TRPOTrainer):
    """A TRPO trainer that, on `probe_steps`, first runs each variant's update on the step's batch
    and undoes it, then takes its own (default) update."""

    def __init__(self, *args, probe_steps: set[int], probe_variants: list[dict], record, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_steps, self.probe_variants, self.record = probe_steps, probe_variants, record

    def policy_update(self, batch, config=None):
        step = self.global_step + 1
        if step in self.probe_steps:
            params = self.actor_critic.policy_parameters()
            origin, generator_state = snapshot(params), self.minibatch_generator.get_state()
            for variant in self.probe_variants:
                seconds: dict[str, float] = {}
                with stopwatch(seconds, "update", self.device):
                    stats = super().policy_update(batch, config=dataclasses.replace(self.config, **variant))
                restore(params, origin)
                self.minibatch_generator.set_state(generator_state)
                self.record(
                    {
                        "step": step,
                        **variant,
                        "update_s": seconds["update"],
                        **{k: v for k, v in stats.items() if k.startswith("trpo/")},
                    }
                )
        return super().policy_update(batch, config)


def summarize(rows: list[dict]) -> str:
    """A markdown table, one row per variant, the gain relative to the run's own update (the first
    variant probed) on the same batch."""
    key = lambda r: (r["cg_iters"], r["fvp_subsample"])  # noqa: E731
    reference = key(rows[0])
    reference_gain = {r["step"]: r["trpo/surrogate_gain"] for r in rows if key(r) == reference}
    lines = [
        "| cg_iters | fvp_subsample | update s (median) | surrogate gain (mean) | gain / the run's update's (mean) "
        "| measured KL (median) | accepted | line-search points (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == variant]
        ratios = [r["trpo/surrogate_gain"] / reference_gain[r["step"]] for r in group if reference_gain.get(r["step"])]
        cells = [
            str(variant[0]),
            str(variant[1]),
            f"{statistics.median(r['update_s'] for r in group):.2f}",
            f"{statistics.mean(r['trpo/surrogate_gain'] for r in group):.3f}",
            f"{statistics.mean(ratios):.2f}" if ratios else "n/a",
            f"{statistics.median(r['trpo/kl'] for r in group):.4f}",
            f"{sum(r['trpo/accepted'] for r in group):.0f}/{len(group)}",
            f"{statistics.median(r['trpo/line_search_iters'] for r in group):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trpo_rlhf.experiments.sentiment import use_all_cpu_cores

    use_all_cpu_cores()
    args.output.mkdir(parents=True, exist_ok=True)
    probes_path = args.output / "probes.jsonl"
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        if len(rows) == 1:
            probes_path.unlink(missing_ok=True)
        append_jsonl(probes_path, row)
        print(
            f"step {row['step']} cg_iters={row['cg_iters']} fvp_subsample={row['fvp_subsample']}: "
            f"{row['update_s']:.1f} s, KL {row['trpo/kl']:.4f}, gain {row['trpo/surrogate_gain']:.4f}",
            file=sys.stderr,
        )

    task = task_for_model(args.model, args.seed)
    config = TRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trpo_step_quality_"),
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_steps=max(args.probe_steps),
        lora_target_modules=task.lora_target_modules,
        cg_iters=args.run_cg_iters,
        max_kl=args.run_max_kl,
        cg_preconditioner=args.run_cg_preconditioner,
    )
    trainer = ProbingTRPOTrainer(
        config,
        task.model,
        task.tokenizer,
        task.reward_model,
        task.prompts,
        probe_steps=set(args.probe_steps),
        probe_variants=variants(args.cg_iters, args.fvp_subsample, args.run_cg_iters),
        record=record,
    )
    while trainer.global_step < config.max_steps:
        trainer.step()
    table = summarize(rows)
    (args.output / "summary.md").write_text(
        f"Model {args.model}, batch {args.batch_size}, {args.max_new_tokens} new tokens, seed {args.seed}, "
        f"probe steps {sorted(set(args.probe_steps))}, the run at cg_iters {args.run_cg_iters}, max_kl "
        f"{args.run_max_kl} and cg_preconditioner {args.run_cg_preconditioner}; every other setting at the TRPOConfig default.\n\n{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
