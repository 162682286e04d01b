"""Is TRPO better than PPO for this model and reward? Train TRPO, our PPO and TRL's PPO (and GRPO) on
the same prompts, model, reward and completions per step, over several seeds, then write
DIR/results.json, DIR/compare.png and DIR/compare.md (the table, also printed), with each
variant's reward-vs-KL-to-reference frontier.

    python recipes/compare_trpo_ppo.py --task toy --steps 30 --seeds 3 --output_dir runs/compare_toy
    python recipes/compare_trpo_ppo.py --task sentiment --steps 50 --seeds 3 --batch_size 32 --parallel 9 --bf16 \
        --learning_rates 3e-4 1e-3 3e-3 --variant "trpo_kl02:--max_kl 0.02" --variant "trpo_cg1:--cg_iters 1"

A variant (`--variant NAME:FLAGS`, repeated) is a run of TRPO, or of the algorithm FLAGS start
with (`--variant "ppo_e8:ppo --ppo_epochs 8"`), with FLAGS added to the shared ones. With
`--learning_rates`, our PPO and TRL's run at each rate and the table marks each one's best (by
its frontier AUC); a second table shows each algorithm at its best at every point, the best of its
variants at 2, 4 and 6 nats (`--frontier_nats`) and in mean reward (the envelope a frontier
comparison draws).

`toy`: a tiny random Llama with a word-level tokenizer, rewarded for each "good" it writes (LoRA on
q_proj, v_proj and lm_head). `sentiment`: the task of the sentiment recipes (embedded SmolLM2 +
VADER offline). `sentiment_binary`: the same with a binary reward, 1 when VADER scores the
completion at least 0.5 (`trpo_rlhf.experiments.build_task`). `exact`: a tiny Llama pretrained on a word
grammar whose completions of at most 3 tokens are all enumerated (`--reward_model dense` or `sparse`):
TRPO's and our PPO's runs log the exact reward and KL to the reference of every step's policy, and
results.json adds each variant's `frontier_efficiency` per KL budget (mean and standard error over
seeds) against the exact optimal frontier, drawn in compare.png (TRL's PPO's policy is evaluated
exactly after each of its updates too, as TRL's GRPO's). `arithmetic`: the arithmetic recipe's chat
prompts and answer-checking reward functions (for TRPO, our PPO and TRL's GRPO; TRL's PPO takes no
reward functions). `--algorithms ... trl_grpo` adds TRL's GRPOTrainer at `--num_generations`
completions per prompt (docs/comparison.md says where its defaults differ from ours). Each
(algorithm, seed) runs in its own process, so peak memory and random state
are its own; its metrics.jsonl is in DIR/<variant>/seed-<k>/, its log in DIR/<variant>/seed-<k>.log. The
comparison holds DIR's lock while it runs and refuses a DIR with an earlier comparison in it unless
--overwrite_output_dir (start over), --reuse_finished or --resume_from_checkpoint. TRL's PPO runs when the
trl-ppo extra is installed (pip install -e .[trl-ppo]) and is skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trpo_rlhf import PPOConfig, TRPOConfig
from trpo_rlhf.checkpointing import latest_checkpoint
from trpo_rlhf.config import RLConfig
from trpo_rlhf.experiments.cli import add_config_fields, add_config_flag, apply_config_file
from trpo_rlhf.experiments.comparison import (
    ALGORITHMS,
    FRONTIER_NATS,
    best_variants,
    envelope_table,
    frontier_envelope,
    label,
    markdown_table,
    plot_comparison,
    summarize_runs,
)
from trpo_rlhf.experiments.exact import EXACT_MAX_NEW_TOKENS, EXACT_REWARDS, efficiency_table, member, plot_exact
from trpo_rlhf.metrics import read_metrics
from trpo_rlhf.run_directory import RunDirectory, check_output_dir_path

TASK_DEFAULTS = {
    # toy: the tiny random model's LoRA tensors take large rates.
    "toy": {"max_new_tokens": 8, "max_kl": 0.05, "learning_rate": 1e-3},
    "sentiment": {"max_new_tokens": 24, "max_kl": TRPOConfig.max_kl, "learning_rate": 1e-4},
    "sentiment_binary": {"max_new_tokens": 24, "max_kl": TRPOConfig.max_kl, "learning_rate": 1e-4},
    "exact": {"max_new_tokens": EXACT_MAX_NEW_TOKENS, "max_kl": TRPOConfig.max_kl, "learning_rate": 1e-3},
    # exact_lm: SmolLM2's one-token completions, enumerated over the vocabulary.
    "exact_lm": {"max_new_tokens": 1, "max_kl": TRPOConfig.max_kl, "learning_rate": 1e-4},
    # arithmetic: the recipe's settings (recipes/trpo_smollm2_arithmetic.py); TRL's PPO takes no reward functions.
    "arithmetic": {"max_new_tokens": 8, "max_kl": 0.08, "learning_rate": 1e-4},
}

# The algorithms a comparison runs unless --algorithms names others (trl_grpo needs --num_generations).
DEFAULT_ALGORITHMS = ("trpo", "ppo", "trl_ppo")
# results.json's keys beside the variants' names.
RESULTS_KEYS = ("best", "envelope", "settings", "exact")
# The tasks whose completions are enumerated: every step's policy is evaluated exactly.
EXACT_TASKS = ("exact", "exact_lm")
REPORT_FILES = ("results.json", "compare.md", "compare.png")
# A variant's name is a folder of DIR: letters, digits, '_', '-', '.' and '+', not starting with a dot.
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")
NUMBER = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)  # a negative value, not a flag
# Config fields the comparison's flags set (`add_config_fields`: each typed and documented as its
# field); unset ones keep the config's defaults. TRPO's solver (fisher_chunks changes the memory
# and the time of an update, not its step):
TRPO_SOLVER_FLAGS = ("cg_iters", "cg_damping", "fisher_chunks")
# PPO's (ours and TRL's):
PPO_FLAGS = ("learning_rate", "ppo_epochs")
# How our trainers' runs go (TRL's PPO takes bf16 alone):
RUN_FLAGS = ("bf16", "compile_generation", "held_out_kl_prompts", "save_steps")
# RLConfig fields of the policy's LoRA adapter, for every algorithm (TRL's PPO builds its adapter
# from them too); unset ones keep RLConfig's defaults.
ADAPTER_FLAGS = ("lora_r", "lora_alpha", "lora_target_modules")
# RLConfig fields of the completions per prompt, the advantages and the KL penalty, for every
# algorithm (TRL's GRPO reads num_generations and scale_rewards); unset ones keep the defaults.
ADVANTAGE_FLAGS = ("num_generations", "advantage_estimator", "scale_rewards", "init_kl_coef")
# RLConfig critic fields for TRPO and our PPO; unset ones keep RLConfig's defaults.
CRITIC_FLAGS = (
    "critic_layer_fraction",
    "critic_layers",
    "critic_lora_target_modules",
    "value_lr",
    "value_epochs",
    "value_minibatch_size",
)
# What a --variant may change: the settings of one run. The rest is the comparison's own.
VARIANT_FLAGS = (
    "max_kl",
    "batch_size",
    *TRPO_SOLVER_FLAGS,
    *PPO_FLAGS,
    *ADAPTER_FLAGS,
    *ADVANTAGE_FLAGS,
    *CRITIC_FLAGS,
    *RUN_FLAGS,
    "grpo_beta",
    "grpo_loss_type",
)
# Set by the comparison for each run: its folder (inside the comparison's, under its lock), its
# seed, its algorithm and whether it resumes. A variant that set one would escape them.
OWNED_FLAGS = ("output_dir", "seed", "worker", "overwrite_output_dir", "resume_from_checkpoint", "resume_worker")
# The flags each task reads (`build_task`'s inputs); one the chosen task would ignore is an error.
TASK_INPUTS = {
    "toy": (),
    "sentiment": ("model_name_or_path", "reward_model", "dataset"),
    "sentiment_binary": ("model_name_or_path", "dataset"),
    "exact": ("reward_model", "exact_member"),
    "exact_lm": ("reward_model",),
    "arithmetic": ("model_name_or_path", "dataset"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
        allow_abbrev=False,  # a variant's `--out X` must not become --output_dir X in its worker
    )
    parser.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="toy")
    parser.add_argument("--steps", type=int, default=30, help="Iterations per run.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds 0..S-1 for every algorithm.")
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument(
        "--algorithms",
        nargs="+",
        choices=ALGORITHMS,
        default=list(DEFAULT_ALGORITHMS),
        help="trl_grpo (TRL's GRPOTrainer) needs --num_generations >= 2.",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=16,
        help="Completions per step (batch_size / num_generations prompts), the same for every algorithm.",
    )
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: 8 (toy), 24 (sentiment).")
    add_config_fields(parser, TRPOConfig, ["max_kl", *TRPO_SOLVER_FLAGS])
    add_config_fields(parser, PPOConfig, PPO_FLAGS)
    add_config_fields(parser, RLConfig, [*ADAPTER_FLAGS, *ADVANTAGE_FLAGS, *CRITIC_FLAGS])
    parser.add_argument(
        "--grpo_beta",
        type=float,
        default=0.0,
        help="trl_grpo: TRL's beta, the KL-to-reference term of its loss (TRL's default 0: no reference).",
    )
    parser.add_argument("--grpo_loss_type", default="dapo", help="trl_grpo: TRL's loss_type (TRL's default 'dapo').")
    parser.add_argument(
        "--learning_rates",
        type=float,
        nargs="+",
        default=None,
        help="Run our PPO and TRL's at each of these rates (a variant each) instead of --learning_rate.",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:FLAGS",
        help="A further run, repeatable: NAME:FLAGS for TRPO with FLAGS (e.g. 'trpo_cg1:--cg_iters 1'), or "
        "NAME:ALGORITHM FLAGS for another algorithm (e.g. 'ppo_e8:ppo --ppo_epochs 8').",
    )
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (one H100 holds about nine).")
    add_config_fields(parser, RLConfig, RUN_FLAGS)
    parser.add_argument(
        "--kl_target",
        type=float,
        default=None,
        help="Count updates whose KL(pi_old||pi_new) exceeds this. Default: max_kl.",
    )
    parser.add_argument(
        "--frontier_nats",
        type=float,
        nargs="+",
        default=list(FRONTIER_NATS),
        help="The KLs to the reference (nats per completion) at which to read each run's reward and its mean "
        "reward from 0 (reward_at_kl, frontier_auc_to_kl): KLs the runs reach, e.g. 0.5 1 for 20 short steps.",
    )
    parser.add_argument("--model_name_or_path", default=None, help="sentiment: policy (default: the recipes' choice).")
    parser.add_argument("--reward_model", default=None, help="sentiment: reward (default: the recipes' choice).")
    parser.add_argument("--dataset", default=None, help="sentiment: prompts (default: the recipes' choice).")
    parser.add_argument(
        "--exact_member",
        default=None,
        help="exact: the family's member, 'seed=S,width=W,words=N,length=L' (default: the original task, seed=0, "
        "width=32, words=7, length=3); its length is the completions' --max_new_tokens.",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start over in an output_dir that holds an earlier comparison, deleting the files it wrote (only those).",
    )
    parser.add_argument(
        "--reuse_finished",
        action="store_true",
        help="Keep every (algorithm, seed) run in output_dir whose metrics.jsonl already has --steps rows; run the rest.",
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
    defaults = dict(TASK_DEFAULTS[args.task])
    if args.task == "exact":
        try:
            defaults["max_new_tokens"] = member(args.exact_member).length
        except ValueError as error:
            parser.error(str(error))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.kl_target = args.kl_target if args.kl_target is not None else args.max_kl
    if args.steps < 1 or args.seeds < 1 or args.parallel < 1:
        parser.error(f"--steps ({args.steps}), --seeds ({args.seeds}) and --parallel ({args.parallel}) must be >= 1")
    if not all(n > 0 for n in args.frontier_nats):
        parser.error(f"--frontier_nats {args.frontier_nats}: each KL must be > 0 nats, e.g. --frontier_nats 0.5 1")
    try:
        check_output_dir_path(args.output_dir, flag="output_dir")
    except (ValueError, OSError) as error:
        parser.error(str(error))
    for flag in ("model_name_or_path", "reward_model", "dataset", "exact_member"):
        if getattr(args, flag) is not None and flag not in TASK_INPUTS[args.task]:
            reads = " and ".join(f"--{name}" for name in TASK_INPUTS[args.task]) or "none of them"
            parser.error(
                f"--{flag} {getattr(args, flag)}: the {args.task} task would ignore it (it reads {reads}); leave it out, "
                "or choose the --task that reads it."
            )
    if args.task in EXACT_TASKS and args.reward_model not in (None, *EXACT_REWARDS):
        parser.error(f"--reward_model {args.reward_model}: the {args.task} task's rewards are {EXACT_REWARDS}.")
    if args.task in EXACT_TASKS and args.max_new_tokens != defaults["max_new_tokens"]:
        parser.error(
            f"--max_new_tokens {args.max_new_tokens}: the {args.task} task enumerates completions of "
            f"{defaults['max_new_tokens']} tokens; leave --max_new_tokens out (on the exact task, --exact_member "
            "'...,length=N' sets it)."
        )
    if not args.worker:
        try:
            args.variants = plan_variants(args)
        except ValueError as error:
            parser.error(str(error))
    return args


@dataclass
class Variant:
    """One row and one curve of the comparison: an algorithm and the flags its runs add."""

    name: str
    algorithm: str
    flags: list[str]


def parse_variant(spec: str) -> Variant:
    """`NAME:FLAGS` (TRPO) or `NAME:ALGORITHM FLAGS`; FLAGS may set only `VARIANT_FLAGS`."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {spec!r}: expected NAME:FLAGS, e.g. 'trpo_cg1:--cg_iters 1'.")
    if not VARIANT_NAME.match(name):
        raise ValueError(
            f"--variant {spec!r}: the name {name!r} is a folder of --output_dir, so it takes letters, digits and _ - . + "
            "only, and no leading dot, e.g. 'trpo_cg1'."
        )
    flags = shlex.split(rest)
    algorithm = flags.pop(0) if flags and flags[0] in ALGORITHMS else "trpo"
    for token in flags:
        if not token.startswith("-") or NUMBER.match(token):
            continue
        flag = token.lstrip("-").partition("=")[0]
        if flag in OWNED_FLAGS:
            raise ValueError(
                f"--variant {spec!r}: --{flag} is the comparison's own (each run's folder, seed, algorithm and resumption "
                "are set for it, inside --output_dir and under its lock): leave it out. A variant of another algorithm "
                "names it first, e.g. 'ppo_e8:ppo --ppo_epochs 8'."
            )
        if flag not in VARIANT_FLAGS or not token.startswith("--"):
            raise ValueError(
                f"--variant {spec!r}: {token} is not a setting a variant may change; a variant sets "
                f"{' '.join('--' + f for f in VARIANT_FLAGS)}."
            )
    return Variant(name, algorithm, flags)


def plan_variants(args: argparse.Namespace) -> list[Variant]:
    """The algorithms (each PPO at every --learning_rates rate), then the --variant runs; each
    variant's flags are checked here, before anything runs."""
    variants = []
    for algorithm in args.algorithms:
        if algorithm in ("ppo", "trl_ppo", "trl_grpo") and args.learning_rates:
            variants += [
                Variant(f"{algorithm}_lr{short(lr)}", algorithm, ["--learning_rate", str(lr)])
                for lr in args.learning_rates
            ]
        else:
            variants.append(Variant(algorithm, algorithm, []))
    variants += [parse_variant(spec) for spec in args.variant]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    reserved = sorted(set(names) & set(RESULTS_KEYS))
    if reserved:
        raise ValueError(
            f"--variant name {reserved[0]!r} is a key of results.json of its own {RESULTS_KEYS}: rename it."
        )
    for v in variants:
        try:
            own = parse_worker_flags(v.flags)
        except ValueError as error:
            raise ValueError(f"variant {v.name!r}: {error} (see --help)") from None
        if args.task == "arithmetic" and v.algorithm == "trl_ppo":
            raise ValueError(
                f"variant {v.name!r}: TRL's PPO scores a text reward, and the arithmetic task's reward functions read "
                "the dataset's answer column: leave trl_ppo out (e.g. --algorithms trpo ppo trl_grpo)."
            )
        generations = own.num_generations if own.num_generations is not None else args.num_generations
        if v.algorithm == "trl_grpo" and (generations or 1) < 2:
            raise ValueError(
                f"variant {v.name!r} runs TRL's GRPO, which needs --num_generations >= 2 (completions per prompt), "
                "e.g. --num_generations 8 (TRL's default)."
            )
        # The config each of its workers will build, built here first: a bad value fails now, named.
        run_dir = Path(args.output_dir) / v.name / "seed-0"
        worker = parse_worker_flags(worker_command(args, v.algorithm, 0, run_dir)[2:] + v.flags, whole=True)
        try:
            worker_config(worker)
        except (ValueError, TypeError) as error:
            raise ValueError(f"variant {v.name!r} ({v.algorithm} {' '.join(v.flags)}): {error}") from None
    return variants


def short(number: float) -> str:
    """3e-4 for 0.0003: a learning rate as a variant's name shows it."""
    mantissa, exponent = f"{number:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def parse_worker_flags(flags: list[str], whole: bool = False) -> argparse.Namespace:
    """What a worker parses from `flags` (`whole`: a worker's whole command line, else flags added
    to a TRPO worker's); `ValueError` with argparse's message where it would refuse them."""
    from contextlib import redirect_stderr
    from io import StringIO

    errors = StringIO()
    try:
        with redirect_stderr(errors):
            return parse_args(flags if whole else ["--worker", "trpo", *flags])
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        message = lines[-1].partition("error: ")[2] if lines else "not valid flags"
        raise ValueError(f"{' '.join(flags)!r}: {message}") from None


def worker_config(args: argparse.Namespace, task=None, output_dir: Path | None = None) -> RLConfig:
    """The config of the run a worker's `args` describe, in `output_dir` (default: its
    --output_dir). `task` (`build_task`'s) adds its LoRA targets and reward weights; without it (the
    main process, checking every variant before any runs) every other setting is built and checked
    the same way."""
    from trpo_rlhf import PPOConfig, TRPOConfig

    # The main process chose to (re)run this folder: a previous run's files in it are replaced,
    # unless it asked for the run to be resumed.
    common = dict(
        output_dir=str(output_dir or args.output_dir),
        overwrite_output_dir=not args.resume_worker,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if task is not None:
        common.update(lora_target_modules=task.lora_target_modules, reward_weights=task.reward_weights)
    for key in (*ADAPTER_FLAGS, *ADVANTAGE_FLAGS, *CRITIC_FLAGS, *RUN_FLAGS):
        if getattr(args, key) is not None:
            common[key] = getattr(args, key)
    ppo = {key: getattr(args, key) for key in PPO_FLAGS if getattr(args, key) is not None}
    if args.worker == "trpo":
        solver = {key: getattr(args, key) for key in TRPO_SOLVER_FLAGS if getattr(args, key) is not None}
        return TRPOConfig(**common, max_kl=args.max_kl, **solver)
    if args.worker in ("trl_ppo", "trl_grpo"):
        for key in ("save_steps", "compile_generation", "held_out_kl_prompts", *CRITIC_FLAGS):
            # TRL generates its own way, updates inside its own loop, and trains its own full value
            # model (PPO) or none (GRPO).
            common.pop(key, None)
    return PPOConfig(**common, **ppo)


def task_inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """`build_task`'s keyword arguments from the flags the task reads (`TASK_INPUTS`)."""
    keyword = {
        "model_name_or_path": "model",
        "reward_model": "reward_model",
        "dataset": "dataset",
        "exact_member": "member",
    }
    return {keyword[flag]: getattr(args, flag) for flag in TASK_INPUTS[args.task]}


def run_worker(args: argparse.Namespace, output_dir: Path) -> None:
    """One (algorithm, seed) run, in this process."""
    from trpo_rlhf import PPOTrainer, TRPOTrainer
    from trpo_rlhf.experiments import build_task
    from trpo_rlhf.experiments.recipe import use_all_cpu_cores

    use_all_cpu_cores(runs_at_once=args.parallel)
    task = build_task(args.task, seed=args.seed, **task_inputs(args))
    config = worker_config(args, task, output_dir)
    resume = True if args.resume_worker else None
    if args.worker == "trpo":
        with_exact_metrics(args, TRPOTrainer(config, **task.trainer_arguments())).train(resume_from_checkpoint=resume)
    elif args.worker == "ppo":
        with_exact_metrics(args, PPOTrainer(config, **task.trainer_arguments())).train(resume_from_checkpoint=resume)
    else:
        from trpo_rlhf.experiments.trl_adapter import build_trl_grpo_for_task, build_trl_ppo_for_task

        hooks = []
        if args.task in EXACT_TASKS:  # TRL's policy, evaluated exactly after each of its updates
            hooks.append(exact_evaluator(args, task.tokenizer, task.prompts, task.reward_model).of_peft_model)
        if args.worker == "trl_ppo":
            build_trl_ppo_for_task(task, config, metric_hooks=hooks).train()
        else:
            build_trl_grpo_for_task(
                task, config, beta=args.grpo_beta, loss_type=args.grpo_loss_type, metric_hooks=hooks
            ).train()


def exact_evaluator(args: argparse.Namespace, tokenizer, prompts, reward_fn, temperature: float = 1.0):
    from trpo_rlhf.experiments.exact import ExactEvaluator

    return ExactEvaluator(tokenizer, prompts, args.max_new_tokens, reward_fn, temperature)


def with_exact_metrics(args: argparse.Namespace, trainer):
    """On an exact task, the trainer logs exact/reward and exact/kl_ref of its policy at every step."""
    if args.task in EXACT_TASKS:
        evaluator = exact_evaluator(
            args, trainer.tokenizer, trainer.prompts, trainer.reward_fn, trainer.config.temperature
        )
        trainer.metric_hooks.append(evaluator)
    return trainer


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
        "--parallel",
        str(args.parallel),
    ]
    for flag in (
        "model_name_or_path",
        "reward_model",
        "dataset",
        "exact_member",
        *TRPO_SOLVER_FLAGS,
        *PPO_FLAGS,
        *ADAPTER_FLAGS,
        *ADVANTAGE_FLAGS,
        *CRITIC_FLAGS,
        *RUN_FLAGS,
        "grpo_beta",
        "grpo_loss_type",
    ):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag}", *map(str, value)] if isinstance(value, list) else [f"--{flag}", str(value)]
    return command


@dataclass
class Job:
    """One (variant, seed) run and, while it runs, its process."""

    variant: Variant
    seed: int
    run_dir: Path
    command: list[str]
    resumed: bool
    process: subprocess.Popen | None = None
    started: float = 0.0
    rows: list[dict] | None = None  # its metrics, once it has finished

    @property
    def name(self) -> str:
        return f"{label(self.variant.name, self.variant.algorithm):>15} seed {self.seed}"

    @property
    def log_path(self) -> Path:
        """Beside the run's folder, which holds only what the run itself writes."""
        return self.run_dir.with_name(f"{self.run_dir.name}.log")


def plan_jobs(args: argparse.Namespace, folder: RunDirectory, runs: dict[str, list[list[dict]]]) -> list[Job]:
    """Every (variant, seed) still to run; finished runs kept by --reuse_finished go into `runs`."""
    jobs, out = [], folder.path
    for variant in args.variants:
        folder.record(variant.name)
        for seed in range(args.seeds):
            run_dir = out / variant.name / f"seed-{seed}"
            if args.reuse_finished and (run_dir / "metrics.jsonl").exists():
                rows = read_metrics(run_dir / "metrics.jsonl")
                if len(rows) == args.steps:
                    runs.setdefault(variant.name, []).append(rows)
                    print(
                        f"{label(variant.name, variant.algorithm):>15} seed {seed}: reusing the finished run in {run_dir}"
                    )
                    continue
            run_dir.mkdir(parents=True, exist_ok=True)
            command = worker_command(args, variant.algorithm, seed, run_dir) + variant.flags
            resumable = args.resume_from_checkpoint and not variant.algorithm.startswith("trl_")
            checkpoint = latest_checkpoint(run_dir) if resumable else None
            if checkpoint is not None:
                print(f"{label(variant.name, variant.algorithm):>15} seed {seed}: resuming from {checkpoint}")
                command.append("--resume_worker")
            else:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            jobs.append(Job(variant, seed, run_dir, command, resumed=checkpoint is not None))
    return jobs


def run_jobs(jobs: list[Job], parallel: int, runs: dict[str, list[list[dict]]]) -> list[str]:
    """Run the jobs, `parallel` at a time, each writing its log; returns the failures. Results
    go into `runs` in the jobs' order, whatever order they finish in."""
    pending, running, failures = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            with open(job.log_path, "a" if job.resumed else "w") as log:
                job.process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT)
            job.started = time.perf_counter()
            running.append(job)
        time.sleep(0.5)
        for job in [j for j in running if j.process.poll() is not None]:
            running.remove(job)
            seconds, code = time.perf_counter() - job.started, job.process.returncode
            if code != 0:
                failures.append(f"{job.variant.name} seed {job.seed}: exit {code}, see {job.log_path}")
                print(f"{job.name}: FAILED (exit {code}); its log: {job.log_path}")
                continue
            job.rows = read_metrics(job.run_dir / "metrics.jsonl")
            print(
                f"{job.name}: {len(job.rows)} steps in {seconds:.0f} s, final reward {job.rows[-1]['reward/mean']:.3f}"
            )
    for job in jobs:
        if job.rows is not None:
            runs.setdefault(job.variant.name, []).append(job.rows)
    return failures


def exact_frontier(
    args: argparse.Namespace, results: dict[str, dict], runs: dict[str, list[list[dict]]]
) -> dict | None:
    """On the exact task: the reference's reward, the optimum at each KL budget and the optimal
    curve; each variant's `frontier_efficiency` goes into its results. None on other tasks."""
    if args.task not in EXACT_TASKS:
        return None
    from trpo_rlhf.experiments import build_task
    from trpo_rlhf.experiments.exact import efficiency_over_seeds, reference_and_optimum

    exact = reference_and_optimum(build_task(args.task, **task_inputs(args)), args.max_new_tokens)
    for variant, result in results.items():
        result["frontier_efficiency"] = efficiency_over_seeds(runs[variant], exact)
    return exact


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args, Path(args.output_dir))
        return 0

    folder = RunDirectory(
        args.output_dir, continue_hint="Complete it with --reuse_finished or --resume_from_checkpoint"
    )
    try:
        with folder.locked():
            if args.reuse_finished or args.resume_from_checkpoint:
                folder.adopt()
            else:
                folder.claim(args.overwrite_output_dir)
            return compare(args, folder)
    except (OSError, RuntimeError, ValueError) as error:  # a foreign, used, locked, crafted or unwritable folder
        print(f"error: {error}", file=sys.stderr)
        return 2


def compare(args: argparse.Namespace, folder: RunDirectory) -> int:
    """Plan, run and summarize the comparison in `folder` (locked and claimed)."""
    out = folder.path
    from trpo_rlhf.experiments.trl_adapter import trl_available

    if any(v.algorithm.startswith("trl_") for v in args.variants) and not trl_available():
        print("TRL is not installed (pip install -e .[trl-ppo], trl==1.12.0): leaving its runs out.")
        args.variants = [v for v in args.variants if not v.algorithm.startswith("trl_")]
    runs: dict[str, list[list[dict]]] = {}
    jobs = plan_jobs(args, folder, runs)
    failures = run_jobs(jobs, args.parallel, runs)
    # Keep the variants' order (reused runs and new ones alike).
    runs = {v.name: runs[v.name] for v in args.variants if v.name in runs}

    if runs:
        algorithms = {v.name: v.algorithm for v in args.variants}
        results = summarize_runs(runs, args.kl_target, algorithms, args.frontier_nats)
        hidden = {
            "worker",
            "seed",
            "reuse_finished",
            "resume_from_checkpoint",
            "resume_worker",
            "variants",
            "overwrite_output_dir",
        }
        settings = {k: v for k, v in vars(args).items() if k not in hidden}
        settings["variants"] = {v.name: {"algorithm": v.algorithm, "flags": v.flags} for v in args.variants}
        envelope = frontier_envelope(results)
        exact = exact_frontier(args, results, runs)
        report = {**results, "best": best_variants(results), "envelope": envelope, "settings": settings}
        if exact:
            report["exact"] = exact
        folder.record(*REPORT_FILES)
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        table = markdown_table(results, args.kl_target)
        if len(results) > len({r["algorithm"] for r in results.values()}):  # some algorithm has several variants
            table += "\n\n" + envelope_table(envelope)
        per_prompt = f" ({args.num_generations} per prompt)" if (args.num_generations or 1) > 1 else ""
        title = f"{args.task}: {args.steps} steps × {args.batch_size} completions{per_prompt}, {args.seeds} seeds"
        if exact:
            labels = {v: label(v, algorithms[v]) for v in results}
            table += "\n\n" + efficiency_table(results, exact, labels)
            plot_exact(
                runs,
                exact,
                out / "compare.png",
                labels,
                title=f"{title}, {args.reward_model or 'dense'} reward"
                + (f", {args.exact_member}" if args.exact_member else ""),
            )
        else:
            plot_comparison(runs, out / "compare.png", title=title, algorithms=algorithms)
        (out / "compare.md").write_text(table + "\n")
        print(table)
        print(f"Wrote {out / 'results.json'}, {out / 'compare.png'} and {out / 'compare.md'}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
