"""Time and memory of one TRPO update against one PPO update on the same rollout, in one process;
with `--whole_step`, of whole training steps of TRPO, our PPO and TRL's PPO.

    python recipes/benchmark.py --model embedded --batch_size 16 --max_new_tokens 24 --repeats 3
    python recipes/benchmark.py --model tiny --repeats 5 --fvp_subsample 0.25
    python recipes/benchmark.py --model embedded --whole_step --steps 3

One rollout is generated and scored; then, `--repeats` times, the policy parameters are set back to
the rollout's and each update runs on that same batch (the order alternates between repeats):

- TRPO: surrogate gradient (which, with the Fisher on the whole batch, also builds the graph the
  Fisher-vector products reuse), the Fisher graph otherwise, conjugate gradient (each FVP), line
  search;
- PPO: `--ppo_epochs` epochs of `--num_minibatches` minibatches (TRL's defaults: 4 and 1) at
  `--ppo_learning_rate`, and the KL and surrogate-gain measurement after them;
- one forward+backward of the batch through the policy (`fwd_bwd_s`) and its backward alone (`bwd_s`).

Peak memory is the growth during each update: CUDA max allocated on a GPU, the process's resident
set size sampled every millisecond on a CPU (trpo_rlhf.profiling). Prints one JSON line of medians
over the repeats (and appends it to `--output` when given):

    {"trpo_update_s": ..., "ppo_update_s": ..., "trpo_peak_mb": ..., "ppo_peak_mb": ...,
     "fvp_s": ..., "fwd_bwd_s": ..., "bwd_s": ..., "cg_iters": ..., "device": ..., ...}

`--whole_step` instead trains each algorithm of `--algorithms` for one warm-up step and `--steps`
measured steps (generation, scoring, rollout forwards, policy and value updates: everything a
training step does), one after the other in this process on the same task and settings, and
prints the medians (TRL's PPO and GRPO, when the trl-ppo extra is installed, report only their
whole step; `--num_generations G --advantage_estimator grpo` runs ours with group advantages and
no critic, as TRL's GRPO, which needs G >= 2;
`<algorithm>_peak_mb` is given on a GPU only, where each step's peak is its own). `--rounds R`
does that R times, the order reversed every other round (trpo ppo trl_ppo, then trl_ppo ppo
trpo, ...), so that a machine whose speed drifts during the run slows each algorithm alike; the
ratios are the median over rounds of each round's ratio, and `_rounds` keys list each round's:

    {"trpo_step_s": ..., "ppo_step_s": ..., "trl_ppo_step_s": ..., "trpo_step_over_trl_ppo": ...,
     "trl_grpo_step_s": ..., "trpo_step_over_trl_grpo": ...,
     "trpo_step_over_trl_ppo_rounds": [...], "trpo_step_s_rounds": [...],
     "trpo_generate_s": ..., "trpo_rollout_forward_s": ..., "trpo_policy_update_s": ...,
     "trpo_value_update_s": ..., "ppo_generate_s": ..., ..., "device": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from trpo_rlhf import PPOConfig, PPOTrainer, RLConfig, TRPOConfig, TRPOTrainer
from trpo_rlhf.actor_critic import double_backward_attention
from trpo_rlhf.advantages import masked_mean
from trpo_rlhf.config import MODEL_DTYPES
from trpo_rlhf.experiments import task_for_model
from trpo_rlhf.experiments.cli import add_config_flag, apply_config_file
from trpo_rlhf.metrics import append_jsonl, json_safe
from trpo_rlhf.profiling import PeakMemory, stopwatch
from trpo_rlhf.rollout import token_logprobs
from trpo_rlhf.trust_region import restore, snapshot

WHOLE_STEP_ALGORITHMS = ("trpo", "ppo", "trl_ppo", "trl_grpo")
# The phases RLTrainer.step times (time/<phase>), reported per algorithm beside the whole step.
STEP_PHASES = ("generate", "score", "rollout_forward", "policy_update", "value_update")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="embedded",
        help="'tiny' (a random 2-layer model with a word-level tokenizer), 'embedded' (SmolLM2-135M, "
        "offline), 'random:135m' / 'random:1.7b' / 'random:8b' / 'random:PATH/config.json' (random weights of that "
        "shape, LoRA on the attention projections), or a hub id / local path.",
    )
    parser.add_argument(
        "--model_dtype",
        default=RLConfig.model_dtype,
        choices=MODEL_DTYPES,
        help="The frozen base's dtype (RLConfig.model_dtype); LoRA, value head and CG stay float32.",
    )
    parser.add_argument(
        "--critic_layer_fraction",
        type=float,
        default=RLConfig.critic_layer_fraction,
        help="RLConfig.critic_layer_fraction.",
    )
    parser.add_argument("--critic_layers", type=int, default=RLConfig.critic_layers, help="RLConfig.critic_layers.")
    parser.add_argument(
        "--critic_lora_target_modules",
        nargs="+",
        default=RLConfig.critic_lora_target_modules,
        help="RLConfig.critic_lora_target_modules.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Completions per step.")
    parser.add_argument(
        "--num_generations",
        type=int,
        default=RLConfig.num_generations,
        help="RLConfig.num_generations (trl_grpo: >= 2).",
    )
    parser.add_argument(
        "--advantage_estimator",
        default=RLConfig.advantage_estimator,
        choices=["gae", "grpo", "rloo"],
        help="RLConfig.advantage_estimator: grpo and rloo run no critic.",
    )
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--num_minibatches", type=int, default=1)
    parser.add_argument(
        "--ppo_learning_rate",
        type=float,
        default=PPOConfig.learning_rate,
        help="PPO's Adam rate (TRL's default 5e-5; LoRA usually wants 1e-4 to 1e-3).",
    )
    parser.add_argument("--cg_iters", type=int, default=TRPOConfig.cg_iters)
    parser.add_argument("--fvp_subsample", type=float, default=TRPOConfig.fvp_subsample)
    parser.add_argument("--fisher_chunks", type=int, default=TRPOConfig.fisher_chunks)
    parser.add_argument("--fvp_method", default=TRPOConfig.fvp_method, choices=["gauss_newton", "kl_hessian"])
    parser.add_argument("--cg_damping", type=float, default=TRPOConfig.cg_damping)
    parser.add_argument("--max_kl", type=float, default=TRPOConfig.max_kl)
    parser.add_argument("--lora_target_modules", nargs="+", default=None)
    parser.add_argument(
        "--compile_generation",
        action="store_true",
        help="RLConfig.compile_generation: a static KV cache and a compiled decode step (our trainers only).",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="RLConfig.gradient_checkpointing: each decoder layer recomputes its activations in the backward "
        "(both updates, the critic's, and the fwd_bwd_s pass).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="Append the JSON line to this file.")
    parser.add_argument(
        "--whole_step",
        action="store_true",
        help="Time whole training steps of each of --algorithms instead of one update on a shared rollout.",
    )
    parser.add_argument("--steps", type=int, default=3, help="--whole_step: measured steps after one warm-up step.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--whole_step: time every algorithm this many times, the order reversed every other round.",
    )
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=["trpo", "ppo", "trl_ppo"],
        choices=WHOLE_STEP_ALGORITHMS,
        help="--whole_step: which trainers to time (trl_ppo and trl_grpo need the trl-ppo extra; trl_grpo "
        "needs --num_generations >= 2).",
    )
    add_config_flag(parser)
    args = parser.parse_args(apply_config_file(parser, argv))
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1.")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1.")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1.")
    if args.whole_step and "trl_grpo" in args.algorithms and args.num_generations < 2:
        parser.error(
            f"--algorithms trl_grpo with --num_generations {args.num_generations}: TRL's GRPO compares the "
            "completions of one prompt, pass --num_generations 2 or more (and --advantage_estimator grpo for ours)."
        )
    return args


def time_forward_backward(trainer: TRPOTrainer, batch) -> tuple[float, float]:
    """(forward+backward, backward) seconds of a policy-gradient loss on the whole batch."""
    params = trainer.actor_critic.policy_parameters()
    seconds: dict[str, float] = {}
    with stopwatch(seconds, "forward", trainer.device):
        logp = token_logprobs(trainer.policy_logits(batch), batch.response_ids)
        loss = masked_mean(logp * batch.advantages, batch.response_mask)
    with stopwatch(seconds, "backward", trainer.device):
        torch.autograd.grad(loss, params)
    return seconds["forward"] + seconds["backward"], seconds["backward"]


def time_lever_baselines(trainer: TRPOTrainer, batch) -> dict[str, float]:
    """Seconds of the alternatives each lever replaces, on the same batch:

    - `fvp_s`: one FVP over the whole batch's graph, built beforehand (what each CG iteration after
      the first costs with `fisher_chunks` 1); `fvp_rebuild_s`: one FVP that builds that graph too;
    - `fwd_bwd_math_s`: forward+backward with attention forced onto the double-backward-capable
      math path (what every pass would cost if the FVP's attention were used everywhere);
    - `forward_s` / `forward_grad_s`: one forward without / with a graph (the cached old
      log-probs and the no-grad line search each save one of these per update).
    """
    params = trainer.actor_critic.policy_parameters()
    fisher = trainer.fisher_batch(batch)
    v = torch.ones(sum(p.numel() for p in params), device=trainer.device)
    seconds = {}
    with stopwatch(seconds, "fvp_rebuild_s", trainer.device):
        fvp = trainer.fisher_product(fisher, trainer.fisher_logits(fisher))  # one graph, whatever fisher_chunks
        fvp(v)
    with stopwatch(seconds, "fvp_s", trainer.device):
        fvp(v)
    del fvp
    with double_backward_attention(trainer.actor_critic.peft_model):
        seconds["fwd_bwd_math_s"], _ = time_forward_backward(trainer, batch)
    with stopwatch(seconds, "forward_s", trainer.device), torch.no_grad():
        trainer.policy_log_probs(batch)
    with stopwatch(seconds, "forward_grad_s", trainer.device):
        trainer.policy_log_probs(batch)
    return seconds


def measure_update(trainer, batch, params, origin) -> tuple[float, float, dict]:
    """(seconds, peak MB, stats) of one policy update from `origin`, which is restored after."""
    seconds = {}
    with PeakMemory(trainer.device) as memory, stopwatch(seconds, "update", trainer.device):
        stats = trainer.policy_update(batch)
    restore(params, origin)
    return seconds["update"], memory.peak_mb, stats


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {threads} threads)"


def trainer_configs(args: argparse.Namespace, task, output_dir: str, max_steps: int = 1) -> tuple:
    """The (TRPOConfig, PPOConfig) both modes run: the benchmark's flags over the configs' defaults."""
    common = dict(
        output_dir=output_dir,
        seed=args.seed,
        max_steps=max_steps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        lora_target_modules=args.lora_target_modules or task.lora_target_modules,
        model_dtype=args.model_dtype,
        critic_layer_fraction=args.critic_layer_fraction,
        critic_layers=args.critic_layers,
        critic_lora_target_modules=args.critic_lora_target_modules,
        compile_generation=args.compile_generation,
        gradient_checkpointing=args.gradient_checkpointing,
        num_generations=args.num_generations,
        advantage_estimator=args.advantage_estimator,
    )
    trpo = TRPOConfig(
        **common,
        cg_iters=args.cg_iters,
        fvp_subsample=args.fvp_subsample,
        fisher_chunks=args.fisher_chunks,
        fvp_method=args.fvp_method,
        cg_damping=args.cg_damping,
        max_kl=args.max_kl,
    )
    ppo = PPOConfig(
        **common, ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches, learning_rate=args.ppo_learning_rate
    )
    return trpo, ppo


def time_whole_steps(algorithm: str, args: argparse.Namespace, output_dir: Path) -> list[dict]:
    """The metrics of one warm-up step and `args.steps` training steps of `algorithm`, on a fresh
    copy of the task (its own model, LoRA initialisation and prompt order)."""
    task = task_for_model(args.model, args.seed, getattr(torch, args.model_dtype))
    trpo_config, ppo_config = trainer_configs(args, task, str(output_dir / algorithm), max_steps=1 + args.steps)
    if algorithm.startswith("trl_"):
        from trpo_rlhf.experiments.trl_adapter import build_trl_grpo_for_task, build_trl_ppo_for_task
        from trpo_rlhf.metrics import read_metrics

        if algorithm == "trl_ppo":
            build_trl_ppo_for_task(task, ppo_config).train()
        else:  # TRL's GRPO at its defaults, without the kl/ref measurement the comparison adds
            build_trl_grpo_for_task(task, ppo_config, measure_kl_ref=False).train()
        return read_metrics(Path(ppo_config.output_dir) / "metrics.jsonl")
    trainer = (
        TRPOTrainer(trpo_config, task.model, task.tokenizer, task.reward_model, task.prompts)
        if algorithm == "trpo"
        else PPOTrainer(ppo_config, task.model, task.tokenizer, task.reward_model, task.prompts)
    )
    return [trainer.step() for _ in range(1 + args.steps)]


def round_orders(algorithms: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: as given, then reversed, and so on, so a steady drift in the
    machine's speed favours no algorithm over an even number of rounds."""
    return [list(algorithms) if r % 2 == 0 else list(reversed(algorithms)) for r in range(rounds)]


def whole_step(args: argparse.Namespace, threads: int) -> dict:
    """Median whole-step seconds and phases of each algorithm, and each one's step over TRL's: the
    median over rounds of the ratio within a round, whose algorithms ran minutes apart."""
    from trpo_rlhf.experiments.trl_adapter import trl_available

    algorithms = list(args.algorithms)
    if not trl_available():
        print("TRL is not installed (pip install -e .[trl-ppo]): leaving its trainers out.", file=sys.stderr)
        algorithms = [a for a in algorithms if not a.startswith("trl_")]
    output_dir = Path(tempfile.mkdtemp(prefix="trpo_benchmark_steps_"))
    rows: dict[str, list[dict]] = {algorithm: [] for algorithm in algorithms}
    step_s_rounds: dict[str, list[float]] = {algorithm: [] for algorithm in algorithms}
    # The warm-up step's generation: where compile_generation pays its compilation.
    warm_up_generate_s: dict[str, list[float | None]] = {algorithm: [] for algorithm in algorithms}
    for index, order in enumerate(round_orders(algorithms, args.rounds)):
        print(f"round {index + 1}/{args.rounds}: {' '.join(order)}", file=sys.stderr)
        for algorithm in order:
            warm_up, *timed = time_whole_steps(algorithm, args, output_dir / f"round-{index}")
            warm_up_generate_s[algorithm].append(warm_up.get("time/generate"))
            rows[algorithm] += timed
            step_s_rounds[algorithm].append(statistics.median(row["time/step"] for row in timed))
            print(f"{algorithm}: {step_s_rounds[algorithm][-1]:.2f} s/step", file=sys.stderr)

    result: dict = {}
    for algorithm in algorithms:
        result[f"{algorithm}_step_s"] = statistics.median(row["time/step"] for row in rows[algorithm])
        result[f"{algorithm}_step_s_rounds"] = step_s_rounds[algorithm]
        for phase in STEP_PHASES:
            if all(f"time/{phase}" in row for row in rows[algorithm]):
                result[f"{algorithm}_{phase}_s"] = statistics.median(row[f"time/{phase}"] for row in rows[algorithm])
        if None not in warm_up_generate_s[algorithm]:
            result[f"{algorithm}_warm_up_generate_s"] = warm_up_generate_s[algorithm]
        if torch.cuda.is_available():  # per step on a GPU; on a CPU the process's lifetime peak, shared by all
            result[f"{algorithm}_peak_mb"] = max(row["memory/peak_mb"] for row in rows[algorithm])
    for algorithm in ("trpo", "ppo"):
        for trl in ("trl_ppo", "trl_grpo"):
            if f"{algorithm}_step_s" in result and f"{trl}_step_s" in result:
                ratios = [
                    ours / theirs
                    for ours, theirs in zip(
                        result[f"{algorithm}_step_s_rounds"], result[f"{trl}_step_s_rounds"], strict=True
                    )
                ]
                result[f"{algorithm}_step_over_{trl}"] = statistics.median(ratios)
                result[f"{algorithm}_step_over_{trl}_rounds"] = ratios
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result.update(
        {
            "device": device_name(device, threads),
            "model": args.model,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "rounds": args.rounds,
            "cg_iters": args.cg_iters,
            "max_kl": args.max_kl,
            "value_epochs": RLConfig.value_epochs,
            "value_minibatch_size": RLConfig.value_minibatch_size,
            "critic_layer_fraction": args.critic_layer_fraction,
            "critic_layers": args.critic_layers,
            "critic_lora_target_modules": args.critic_lora_target_modules,
            "model_dtype": args.model_dtype,
            "compile_generation": args.compile_generation,
            "gradient_checkpointing": args.gradient_checkpointing,
            "ppo_epochs": args.ppo_epochs,
            "num_minibatches": args.num_minibatches,
            "torch": torch.__version__,
        }
    )
    return result


def five_digits(value):
    if isinstance(value, float):
        return float(f"{value:.5g}")
    return [five_digits(v) for v in value] if isinstance(value, list) else value


def print_row(result: dict, output: Path | None) -> None:
    row = json_safe({key: five_digits(value) for key, value in result.items()})
    print(json.dumps(row, allow_nan=False))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(output, row)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trpo_rlhf.experiments.recipe import use_all_cpu_cores

    threads = use_all_cpu_cores()
    if args.whole_step:
        print_row(whole_step(args, threads), args.output)
        return 0
    task = task_for_model(args.model, args.seed, getattr(torch, args.model_dtype))
    trpo_config, ppo_config = trainer_configs(args, task, tempfile.mkdtemp(prefix="trpo_benchmark_"))
    trpo = TRPOTrainer(trpo_config, task.model, task.tokenizer, task.reward_model, task.prompts)
    # The PPO trainer shares the TRPO trainer's PeftModel: the same policy tensors, the same rollout.
    ppo = PPOTrainer(ppo_config, trpo.actor_critic.peft_model, trpo.tokenizer, task.reward_model, task.prompts)
    batch, _ = trpo.collect_batch()
    params = trpo.actor_critic.policy_parameters()
    origin = snapshot(params)

    time_forward_backward(trpo, batch)  # warm-up: first-call allocations and kernel selection
    rows = []
    for repeat in range(args.repeats):
        row = {}
        row["fwd_bwd_s"], row["bwd_s"] = time_forward_backward(trpo, batch)
        row.update(time_lever_baselines(trpo, batch))
        for name in ("trpo", "ppo") if repeat % 2 == 0 else ("ppo", "trpo"):
            if name == "ppo":  # a fresh Adam each time: every repeat is the first update from origin
                ppo.policy_optimizer = torch.optim.Adam(params, lr=ppo_config.learning_rate)
            trainer = trpo if name == "trpo" else ppo
            seconds, peak_mb, stats = measure_update(trainer, batch, params, origin)
            row[f"{name}_update_s"], row[f"{name}_peak_mb"] = seconds, peak_mb
            row.update({f"{name}:{k}": v for k, v in stats.items()})
        row["ppo_epoch_s"] = row["ppo:time/policy_epochs"] / row["ppo:ppo/epochs_run"]
        rows.append(row)
        print(
            f"repeat {repeat + 1}/{args.repeats}: TRPO {row['trpo_update_s']:.2f} s, {row['trpo_peak_mb']:.0f} MB; "
            f"PPO {row['ppo_update_s']:.2f} s, {row['ppo_peak_mb']:.0f} MB",
            file=sys.stderr,
        )

    def median(key: str) -> float | None:
        # None where no repeat measured it (e.g. no line search ran: the update found no direction).
        values = [row[key] for row in rows if key in row]
        return statistics.median(values) if values else None

    result = {
        "trpo_update_s": median("trpo_update_s"),
        "ppo_update_s": median("ppo_update_s"),
        "trpo_peak_mb": median("trpo_peak_mb"),
        "ppo_peak_mb": median("ppo_peak_mb"),
        "fvp_s": median("fvp_s"),
        "fwd_bwd_s": median("fwd_bwd_s"),
        "bwd_s": median("bwd_s"),
        "cg_iters": median("trpo:trpo/cg_iters"),
        "device": device_name(trpo.device, threads),
        **{key: median(key) for key in ("fvp_rebuild_s", "fwd_bwd_math_s", "forward_s", "forward_grad_s")},
        "trpo_gradient_s": median("trpo:time/policy_gradient"),
        "trpo_fvp_graph_s": median("trpo:time/policy_fvp_graph"),
        "trpo_cg_s": median("trpo:time/policy_cg"),
        "trpo_line_search_s": median("trpo:time/policy_line_search"),
        "trpo_fvp_count": median("trpo:trpo/fvp_count"),
        "trpo_kl": median("trpo:trpo/kl"),
        "trpo_accepted": median("trpo:trpo/accepted"),
        "trpo_line_search_iters": median("trpo:trpo/line_search_iters"),
        "trpo_step_frac": median("trpo:trpo/step_frac"),
        "trpo_surrogate_gain": median("trpo:trpo/surrogate_gain"),
        "ppo_surrogate_gain": median("ppo:ppo/surrogate_gain"),
        "ppo_epoch_s": median("ppo_epoch_s"),
        "ppo_measure_kl_s": median("ppo:time/policy_measure_kl"),
        "ppo_kl": median("ppo:ppo/kl"),
        "model": args.model,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "sequence_tokens": int(batch.input_ids.shape[1]),
        "repeats": args.repeats,
        "fvp_subsample": args.fvp_subsample,
        "fisher_chunks": args.fisher_chunks,
        "fvp_method": args.fvp_method,
        "model_dtype": args.model_dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "cg_damping": args.cg_damping,
        "ppo_epochs": args.ppo_epochs,
        "num_minibatches": args.num_minibatches,
        "ppo_learning_rate": args.ppo_learning_rate,
        "torch": torch.__version__,
    }
    result["update_time_ratio"] = result["trpo_update_s"] / result["ppo_update_s"]
    result["peak_mb_ratio"] = (
        result["trpo_peak_mb"] / result["ppo_peak_mb"] if result["ppo_peak_mb"] > 0 else float("nan")
    )
    result["fvp_over_bwd"] = result["fvp_s"] / result["bwd_s"]
    result["fvp_over_fwd_bwd"] = result["fvp_s"] / result["fwd_bwd_s"]
    print_row(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
