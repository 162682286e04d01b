"""Is TRPO better than PPO for this model and reward? Train TRPO, our PPO and TRL's PPO on the same
prompts, model, reward and number of prompts per step, over several seeds, then write
DIR/results.json, DIR/compare.png and DIR/compare.md (the table, also printed).

    python recipes/compare_trpo_ppo.py --task toy --steps 30 --seeds 3 --output_dir runs/compare_toy
    python recipes/compare_trpo_ppo.py --task sentiment --steps 20 --seeds 2 --output_dir runs/compare_sentiment \
        --model_name_or_path embedded --reward_model vader

`toy`: a tiny random Llama with a word-level tokenizer, rewarded for each "good" it writes (LoRA on
q_proj, v_proj and lm_head). `sentiment`: the task of the sentiment recipes (embedded SmolLM2 +
VADER offline). Each (algorithm, seed) runs in its own process, so peak memory and random state
are its own; its metrics.jsonl and log are in DIR/<algorithm>/seed-<k>/. TRL's PPO runs when the
trl-ppo extra is installed (pip install -e .[trl-ppo]) and is skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trpo_rlhf.checkpointing import latest_checkpoint
from trpo_rlhf.experiments.cli import add_config_flag, apply_config_file
from trpo_rlhf.experiments.comparison import ALGORITHMS, LABELS, markdown_table, plot_comparison, summarize_runs
from trpo_rlhf.metrics import read_metrics
from trpo_rlhf.profiling import stopwatch

TASK_DEFAULTS = {
    # toy: the tiny random model's LoRA tensors take large rates.
    "toy": {"max_new_tokens": 8, "max_kl": 0.05, "learning_rate": 1e-3},
    "sentiment": {"max_new_tokens": 24, "max_kl": 0.02, "learning_rate": 1e-4},
}

# TRPOConfig fields the comparison can set; unset ones keep TRPOConfig's defaults.
TRPO_SOLVER_FLAGS = ("cg_iters", "cg_damping", "logit_damping")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="toy")
    parser.add_argument("--steps", type=int, default=30, help="Iterations per run.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds 0..S-1 for every algorithm.")
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per step, the same for every algorithm.")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: 8 (toy), 24 (sentiment).")
    parser.add_argument(
        "--max_kl", type=float, default=None, help="TRPO's delta. Default: 0.05 (toy), 0.02 (sentiment)."
    )
    parser.add_argument(
        "--cg_iters",
        type=int,
        default=None,
        help="TRPO's conjugate-gradient iterations. Default: TRPOConfig's (10); 3 makes its update cost what PPO's does.",
    )
    parser.add_argument(
        "--cg_damping", type=float, default=None, help="TRPO's damping c in (F + cI) x = g. Default: TRPOConfig's."
    )
    parser.add_argument(
        "--logit_damping", type=float, default=None, help="TRPO's logit-space damping. Default: TRPOConfig's."
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="PPO's (ours and TRL's). Default: 1e-3 (toy), 1e-4 (sentiment).",
    )
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument(
        "--kl_target",
        type=float,
        default=None,
        help="Count updates whose KL(pi_old||pi_new) exceeds this. Default: max_kl.",
    )
    parser.add_argument("--model_name_or_path", default=None, help="sentiment: policy (default: the recipes' choice).")
    parser.add_argument("--reward_model", default=None, help="sentiment: reward (default: the recipes' choice).")
    parser.add_argument("--dataset", default=None, help="sentiment: prompts (default: the recipes' choice).")
    parser.add_argument(
        "--reuse_finished",
        action="store_true",
        help="Keep every (algorithm, seed) run in output_dir whose metrics.jsonl already has --steps rows; run the rest.",
    )
    parser.add_argument(
        "--save_steps",
        type=int,
        default=0,
        help="TRPO and our PPO save a resumable checkpoint every this many steps (0: none).",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        action="store_true",
        help="Continue each unfinished TRPO / PPO run from its newest checkpoint instead of starting it over "
        "(TRL's PPO cannot resume and starts over).",
    )
    parser.add_argument("--worker", choices=ALGORITHMS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resume_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    add_config_flag(parser)
    args = parser.parse_args(apply_config_file(parser, argv))
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.kl_target = args.kl_target if args.kl_target is not None else args.max_kl
    if args.steps < 1 or args.seeds < 1:
        parser.error(f"--steps ({args.steps}) and --seeds ({args.seeds}) must be >= 1")
    return args


def trl_available() -> bool:
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError:
        return False
    return True


def run_worker(args: argparse.Namespace, output_dir: Path) -> None:
    """One (algorithm, seed) run, in this process."""
    from trpo_rlhf import PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer
    from trpo_rlhf.experiments import build_task
    from trpo_rlhf.experiments.sentiment import use_all_cpu_cores

    use_all_cpu_cores()
    task_inputs = (
        {}
        if args.task == "toy"
        else dict(model=args.model_name_or_path, reward_model=args.reward_model, dataset=args.dataset)
    )
    task = build_task(args.task, seed=args.seed, **task_inputs)
    # The main process chose to (re)run this folder: a previous run's files in it are replaced,
    # unless it asked for the run to be resumed.
    common = dict(
        output_dir=str(output_dir),
        overwrite_output_dir=not args.resume_worker,
        save_steps=args.save_steps,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        lora_target_modules=task.lora_target_modules,
    )
    resume = True if args.resume_worker else None

    if args.worker == "trpo":
        solver = {key: getattr(args, key) for key in TRPO_SOLVER_FLAGS if getattr(args, key) is not None}
        config = TRPOConfig(**common, max_kl=args.max_kl, **solver)
        TRPOTrainer(config, task.model, task.tokenizer, task.reward_model, task.prompts).train(
            resume_from_checkpoint=resume
        )
    elif args.worker == "ppo":
        config = PPOConfig(**common, learning_rate=args.learning_rate, ppo_epochs=args.ppo_epochs)
        PPOTrainer(config, task.model, task.tokenizer, task.reward_model, task.prompts).train(
            resume_from_checkpoint=resume
        )
    else:
        common.pop("save_steps")
        from trpo_rlhf.experiments.toy import build_tiny_value_model
        from trpo_rlhf.experiments.trl_adapter import build_trl_ppo_trainer, load_policy_and_value_model
        from trpo_rlhf.rewards import build_reward_fn

        config = PPOConfig(**common, learning_rate=args.learning_rate, ppo_epochs=args.ppo_epochs)
        if args.task == "toy":  # TRL's PPO wants a separate value model: the toy backbone with a scalar head
            model, value_model, tokenizer = (
                task.model,
                build_tiny_value_model(task.tokenizer, seed=args.seed),
                task.tokenizer,
            )
        else:
            model, value_model, tokenizer = load_policy_and_value_model(task.model)
        build_trl_ppo_trainer(
            config, model, value_model, tokenizer, task.prompts, build_reward_fn(task.reward_model)
        ).train()


def worker_command(args: argparse.Namespace, algorithm: str, seed: int, output_dir: Path) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        algorithm,
        "--seed",
        str(seed),
        "--output_dir",
        str(output_dir),
        "--task",
        args.task,
        "--steps",
        str(args.steps),
        "--batch_size",
        str(args.batch_size),
        "--max_new_tokens",
        str(args.max_new_tokens),
        "--max_kl",
        str(args.max_kl),
        "--learning_rate",
        str(args.learning_rate),
        "--ppo_epochs",
        str(args.ppo_epochs),
        "--save_steps",
        str(args.save_steps),
    ]
    for flag in ("model_name_or_path", "reward_model", "dataset", *TRPO_SOLVER_FLAGS):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    return command


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args, Path(args.output_dir))
        return 0

    out = Path(args.output_dir)
    algorithms = list(args.algorithms)
    if "trl_ppo" in algorithms and not trl_available():
        print("TRL's PPO is not installed (pip install -e .[trl-ppo], trl==1.12.0): comparing TRPO and our PPO only.")
        algorithms.remove("trl_ppo")
    runs: dict[str, list[list[dict]]] = {}
    failures = []
    for algorithm in algorithms:
        for seed in range(args.seeds):
            run_dir = out / algorithm / f"seed-{seed}"
            if args.reuse_finished and (run_dir / "metrics.jsonl").exists():
                rows = read_metrics(run_dir / "metrics.jsonl")
                if len(rows) == args.steps:
                    runs.setdefault(algorithm, []).append(rows)
                    print(f"{LABELS[algorithm]:>15} seed {seed}: reusing the finished run in {run_dir}")
                    continue
            run_dir.mkdir(parents=True, exist_ok=True)
            command = worker_command(args, algorithm, seed, run_dir)
            checkpoint = latest_checkpoint(run_dir) if args.resume_from_checkpoint and algorithm != "trl_ppo" else None
            if checkpoint is not None:
                print(f"{LABELS[algorithm]:>15} seed {seed}: resuming from {checkpoint}")
                command.append("--resume_worker")
            else:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            seconds: dict[str, float] = {}
            with open(run_dir / "log.txt", "a" if checkpoint else "w") as log, stopwatch(seconds, "run"):
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
            if code != 0:
                failures.append(f"{algorithm} seed {seed}: exit {code}, see {run_dir / 'log.txt'}")
                print(f"{LABELS[algorithm]:>15} seed {seed}: FAILED (exit {code}); its log: {run_dir / 'log.txt'}")
                continue
            rows = read_metrics(run_dir / "metrics.jsonl")
            runs.setdefault(algorithm, []).append(rows)
            print(
                f"{LABELS[algorithm]:>15} seed {seed}: {len(rows)} steps in {seconds['run']:.0f} s, "
                f"final reward {rows[-1]['reward/mean']:.3f}"
            )

    if runs:
        results = summarize_runs(runs, args.kl_target)
        settings = {
            k: v
            for k, v in vars(args).items()
            if k not in {"worker", "seed", "reuse_finished", "resume_from_checkpoint", "resume_worker"}
        }
        (out / "results.json").write_text(json.dumps({**results, "settings": settings}, indent=2) + "\n")
        table = markdown_table(results, args.kl_target)
        (out / "compare.md").write_text(table + "\n")
        plot_comparison(
            runs,
            out / "compare.png",
            title=f"{args.task}: {args.steps} steps × {args.batch_size} prompts, {args.seeds} seeds",
        )
        print(table)
        print(f"Wrote {out / 'results.json'}, {out / 'compare.png'} and {out / 'compare.md'}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
