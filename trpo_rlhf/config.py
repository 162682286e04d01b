"""The settings every on-policy RLHF trainer in this package shares (`RLConfig`: rollout, reward
shaping, GAE, value function, LoRA, checkpoints). Each algorithm's config extends it in its own
module (`trpo.TRPOConfig`, `ppo.PPOConfig`). They are plain dataclasses, so recipes expose every
field as a command-line flag through `HfArgumentParser`:

    >>> from trpo_rlhf import RLConfig
    >>> RLConfig(output_dir="runs/x", max_steps=50).value_epochs
    4
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .run_directory import check_output_dir_path
from .tracking import check_report_to

SEED_LIMIT = 2**32  # NumPy's seeds, which set_seed passes it, are in [0, 2**32)
# Settings earlier releases had and measurements removed (docs/results.md, "what left the package";
# last in commit 55f5382), at the defaults they had there. A saved config that holds one at that
# value still loads and resumes, with a warning; any other value ran an update this package no
# longer has, and is refused.
REMOVED_SETTINGS = {
    "cg_stop": "iterations",
    "held_out_fraction": 0.5,
    "logit_damping": 0.0,
    "cg_preconditioner": "gradient_rms",
    "preconditioner_beta": 0.999,
    "fisher_quadratic": "measured_kl",
    "momentum": 0.5,
    "max_token_kl": None,
    "signal_shrinkage": False,
    "signal_shrinkage_beta": 0.9,
    "kl_penalty": "reward",
    "critic": "adapter",
}
MIN_TEMPERATURE = 1e-2  # below it softmax(logits / T) is one-hot in float32: no token has a gradient
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")
GROUP_ESTIMATORS = ("grpo", "rloo")  # critic-free: a baseline from the prompt's other completions
SCALE_REWARDS = ("group", "batch", "none")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _matches(value, hint) -> bool:
    """Whether `value` is of the annotated type (int for a float field is fine, bool for a number is not)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None") if not isinstance(hint, type) else hint.__name__


def check_field_types(config) -> None:
    """Every field of the dataclass `config` has its annotated type and every number is finite,
    so that a wrong value fails here, naming the field, rather than as a TypeError deep in a step."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        _require(
            _matches(value, hint),
            f"{f.name}={value!r} must be {_type_name(hint)}, not {type(value).__name__} (e.g. {f.name}={f.default!r}).",
        )
        for i, number in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(number, numbers.Real) and not isinstance(number, bool) and not math.isfinite(number):
                where = (
                    f"{f.name}[{i}]={number} (in {f.name}={value})" if isinstance(value, list) else f"{f.name}={value}"
                )
                raise ValueError(f"{where} must be a finite number.")


@dataclass
class RLConfig:
    """Settings shared by the on-policy trainers (rollout, rewards, advantages, critic, LoRA).

    Defaults are the ones that train the sentiment task (`recipes/trpo_gpt2_sentiment.py`); the
    comment on each says where it comes from.
    """

    output_dir: str = field(
        default="runs/trpo",
        metadata={
            "help": "Where metrics.jsonl, checkpoints and the final adapter go: a new or empty folder, or one of an "
            "earlier run of this toolkit (never the working directory or home; a folder holding anything else is refused)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for LoRA init, prompt order and sampling."})
    max_steps: int = field(default=100, metadata={"help": "Number of rollout + update iterations `train()` runs."})
    batch_size: int = field(
        default=16,
        metadata={
            "help": "Completions per iteration (per process): batch_size / num_generations prompts, each sampled "
            "num_generations times (TRL's per-device batch)."
        },
    )
    num_generations: int = field(
        default=1,
        metadata={
            "help": "Completions sampled per prompt (TRL's num_generations, G); batch_size must be a multiple of it. "
            "The group estimators (advantage_estimator grpo, rloo) compare a prompt's completions, so they need G >= 2."
        },
    )
    advantage_estimator: str = field(
        default="gae",
        metadata={
            "help": "gae: generalised advantage estimation (Schulman et al. 2016) with the LoRA critic. grpo: each "
            "completion's return minus its group's mean, scaled by scale_rewards (Shao et al. 2024; TRL's GRPO). "
            "rloo: minus the mean of the group's other completions (Ahmadian et al. 2024). grpo and rloo build no "
            "critic: no value adapter, no value pass, no value update."
        },
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "grpo's advantages divided by the std of their group's returns (group), of the batch's (batch), or "
            "not at all (none), as TRL's scale_rewards. Only advantage_estimator grpo reads it."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward function in reward_funcs: a completion's score is their weighted sum "
            "(TRL's reward_weights). None: every weight 1."
        },
    )
    max_new_tokens: int = field(default=24, metadata={"help": "Response length cap; generation stops earlier at EOS."})
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature. Every log-prob (old, new, reference, KL) is taken from softmax(logits/temperature), "
            "exactly the distribution sampled from; no top-k/top-p truncation."
        },
    )
    compile_generation: bool = field(
        default=False,
        metadata={
            "help": "Decode with a static KV cache sized to the longest prompt plus max_new_tokens and the decode step "
            "compiled with torch.compile (on CUDA in mode reduce-overhead: CUDA graphs). The first step pays the "
            "compilation; later ones sample the same distribution with fewer kernel launches. Not with a sharded base, "
            "nor with bf16 over a float32 base (set model_dtype bfloat16)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Keep only each decoder layer's inputs in the graph of every pass that builds one (the policy "
            "gradient, Fisher-vector products, PPO's minibatches, the critic's update) and recompute the layer's "
            "activations during the backward (Chen et al. 2016): the activations of one layer at a time instead of all, "
            "for about one more forward per backward. The gradients are those without it (the recomputation replays "
            "the forward's random state)."
        },
    )
    # Reward shaping (Ziegler et al. 2019, eq. 2): r_t = -beta * (log pi - log pi_ref), score at the last token.
    init_kl_coef: float = field(
        default=0.05, metadata={"help": "beta, the per-token KL penalty to the reference (TRL PPO's kl_coef)."}
    )
    target_kl_ref: float | None = field(
        default=None,
        metadata={
            "help": "Target of the adaptive KL controller, in nats per completion (sum over tokens). None keeps beta fixed. "
            "Ziegler et al. use 6."
        },
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "Horizon (in samples) of the adaptive KL controller (Ziegler et al.: 10000)."}
    )
    # GAE (Schulman et al. 2016). gamma=1: the episode is one short completion, no discounting is needed.
    gamma: float = field(default=1.0, metadata={"help": "Discount over response tokens."})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda (TRL's default)."})
    whiten_advantages: bool = field(
        default=True,
        metadata={
            "help": "Normalise GAE's advantages to mean 0, std 1 over the valid tokens of the batch (the group "
            "estimators scale theirs by scale_rewards instead)."
        },
    )
    # Critic: a scalar head on its own LoRA adapter of the shared frozen base; it never moves the policy.
    critic_layer_fraction: float = field(
        default=0.4,
        metadata={
            "help": "put the critic's LoRA adapter on the top round(fraction x n) of the model's n "
            "decoder layers (at least one; 12 of SmolLM2's 30). Below them the critic is the frozen base, which the "
            "rollout's reference forward already runs, so the critic's passes (its rollout forward and every pass of "
            "its update) start from the hidden states that forward computed and run those layers instead of all; on "
            "a backbone that cannot be entered at a layer (GPT-2 adds position embeddings to its input) they run "
            "every layer. 1.0: the adapter spans every layer. critic_layers, when set, overrides it."
        },
    )
    critic_layers: int | None = field(
        default=None,
        metadata={
            "help": "put the critic's LoRA adapter on the top N decoder layers (instead of "
            "critic_layer_fraction of them), its passes run from the reference forward's hidden states below them; "
            "a backbone that cannot be entered at a layer is refused. None: critic_layer_fraction sets the layers."
        },
    )
    critic_lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "the modules the critic's LoRA adapter adapts on its layers, e.g. q_proj v_proj. "
            "None (or all-linear): every linear module of those layers but the output head (PEFT's all-linear), "
            "cheap on the top layers since the frozen base's matmuls dominate a pass."
        },
    )
    value_lr: float = field(
        default=5e-4, metadata={"help": "Adam learning rate of the value adapter and head (a LoRA-sized rate)."}
    )
    value_epochs: int = field(
        default=4, metadata={"help": "Epochs of value regression per iteration (TRL's 4 PPO epochs)."}
    )
    value_minibatch_size: int = field(default=8, metadata={"help": "Sequences per value-update minibatch."})
    value_clip_range: float | None = field(
        default=0.2,
        metadata={
            "help": "Clip the value prediction to old value +- this in the loss (TRL's cliprange_value). None: plain MSE."
        },
    )
    # LoRA (Hu et al. 2021). Dropout only acts in the value update: every policy pass runs in eval mode
    # so the trust region measures one deterministic policy.
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the policy and value adapters."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (value adapter training only)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt, e.g. q_proj v_proj. None: PEFT's default for the architecture "
            "(q_proj,v_proj for Llama; c_attn for GPT-2)."
        },
    )
    save_steps: int = field(
        default=0,
        metadata={
            "help": "Save a resumable checkpoint-<step> every this many steps (0: none besides the final save and the "
            "checkpoint written when a run is interrupted)."
        },
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest this many checkpoint-<step> folders (None: all)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds a previous run, deleting the files that run wrote (and "
            "nothing else). Without it such a run stops with an error (use --resume_from_checkpoint to continue it)."
        },
    )
    ignore_checkpoint_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint of another run (another output_dir's), or one saved with another base "
            "model or tokenizer, with a warning instead of the error each of them is otherwise."
        },
    )
    reward_timeout: float | None = field(
        default=None,
        metadata={
            "help": "Seconds a reward function may take on one batch before the run stops with a RewardError naming the "
            "batch (its last completed step saved). None: no limit."
        },
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Stop the run with an error after this many consecutive steps whose rewards, advantages, gradients, "
            "CG solution or step were not finite (each such step is rejected and the policy and critic restored)."
        },
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Experiment trackers to log every metric to, through accelerate: none (metrics.jsonl only), all, or "
            "names such as tensorboard, wandb, trackio (as in transformers and TRL)."
        },
    )
    run_name: str | None = field(
        default=None, metadata={"help": "The trackers' run/project name. None: the output_dir's folder name."}
    )
    log_completions_steps: int = field(
        default=10,
        metadata={
            "help": "Log a table of the batch's prompts, completions and rewards to the trackers every this many steps (0: never)."
        },
    )
    held_out_kl_prompts: int = field(
        default=0,
        metadata={
            "help": "Per process and step, sample completions from pi_old for this many prompts outside the step's batch "
            "and log policy/kl_held_out, the update's KL(pi_old || pi_new) per completion on them: whether the trust "
            "region holds out of sample. Sampled on a random stream of their own, so the run's trajectory is the one "
            "it has without them; costs their generation and two forwards. 0: off."
        },
    )
    model_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the frozen base model's weights: float32, bfloat16 or float16. A model given by name is "
            "loaded in it, a given model's base weights are cast to it. The LoRA tensors and the value head stay "
            "float32, and logits are cast to float32 before any softmax, so log-probs, KLs, gradients and CG stay "
            "float32. bfloat16 halves the base's memory (an 8B base: 16 GB instead of 32)."
        },
    )
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Run the model's forwards (generation, rollout, updates) under bfloat16 autocast, for GPUs. "
            "Logits are cast to float32 before any softmax, so log-probs, KLs, gradients, CG vectors and dot "
            "products stay float32; the LoRA tensors stay float32."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if isinstance(self.output_dir, str):
            check_output_dir_path(self.output_dir)
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        if isinstance(self.critic_lora_target_modules, tuple):
            self.critic_lora_target_modules = list(self.critic_lora_target_modules)
        if isinstance(self.reward_weights, tuple):
            self.reward_weights = list(self.reward_weights)
        if isinstance(self.scale_rewards, bool):  # TRL's True / False
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if isinstance(self.report_to, str):  # report_to="tensorboard", as transformers accepts it
            self.report_to = [self.report_to]
        if isinstance(self.report_to, tuple):
            self.report_to = list(self.report_to)
        check_field_types(self)
        check_report_to(self.report_to)
        _require(
            0 <= self.seed < SEED_LIMIT,
            f"seed={self.seed} must be in [0, 2**32) (NumPy's seed range), e.g. --seed 0.",
        )
        _require(
            self.batch_size >= 1,
            f"batch_size={self.batch_size} must be >= 1: set --batch_size to a positive number of prompts.",
        )
        _require(
            self.num_generations >= 1 and self.batch_size % self.num_generations == 0,
            f"num_generations={self.num_generations} must be >= 1 and divide batch_size={self.batch_size} (the "
            f"completions per step), e.g. --batch_size {max(self.num_generations, 1) * 4} --num_generations "
            f"{max(self.num_generations, 1)}.",
        )
        _require(
            self.advantage_estimator in ADVANTAGE_ESTIMATORS,
            f"advantage_estimator={self.advantage_estimator!r} is not one of {ADVANTAGE_ESTIMATORS}.",
        )
        _require(
            self.advantage_estimator not in GROUP_ESTIMATORS or self.num_generations >= 2,
            f"advantage_estimator={self.advantage_estimator!r} compares the completions of one prompt, so it needs "
            f"num_generations >= 2 (it is {self.num_generations}), e.g. --num_generations 8 (TRL's default).",
        )
        _require(
            self.scale_rewards in SCALE_REWARDS,
            f"scale_rewards={self.scale_rewards!r} is not one of {SCALE_REWARDS} (TRL's values; True is 'group', "
            "False 'none').",
        )
        _require(
            self.reward_weights is None or len(self.reward_weights) >= 1,
            "reward_weights=[] holds no weight: pass one per reward function, or None for weights of 1.",
        )
        _require(self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1.")
        _require(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        _require(
            self.temperature >= MIN_TEMPERATURE,
            f"temperature={self.temperature} must be >= {MIN_TEMPERATURE}: lower, softmax(logits / temperature) is one "
            "token with probability 1 in float32, which leaves no gradient to train on (1.0 samples from the model's "
            "own distribution).",
        )
        _require(self.init_kl_coef >= 0, f"init_kl_coef={self.init_kl_coef} must be >= 0 (0 disables the KL penalty).")
        _require(
            self.target_kl_ref is None or self.target_kl_ref > 0,
            f"target_kl_ref={self.target_kl_ref} must be > 0, or None for a fixed KL coefficient.",
        )
        _require(self.kl_horizon >= 1, f"kl_horizon={self.kl_horizon} must be >= 1.")
        _require(0.0 <= self.gamma <= 1.0, f"gamma={self.gamma} must be in [0, 1].")
        _require(0.0 <= self.gae_lambda <= 1.0, f"gae_lambda={self.gae_lambda} must be in [0, 1].")
        _require(
            self.model_dtype in MODEL_DTYPES,
            f"model_dtype={self.model_dtype!r} is not one of {MODEL_DTYPES} (e.g. --model_dtype bfloat16).",
        )
        _require(
            not (self.compile_generation and self.bf16 and self.model_dtype == "float32"),
            "compile_generation=True with bf16=True over a float32 base: under autocast the keys leave the rotary "
            "embedding in float32 and the values the projection in bfloat16, which one static KV cache cannot hold. "
            "Set --model_dtype bfloat16 (the base's weights in bfloat16, with or without --bf16), or leave "
            "--compile_generation off.",
        )
        _require(
            0.0 < self.critic_layer_fraction <= 1.0,
            f"critic_layer_fraction={self.critic_layer_fraction} must be in (0, 1] (1.0: every layer), e.g. "
            "--critic_layer_fraction 0.4.",
        )
        _require(
            self.critic_layers is None or self.critic_layers >= 1,
            f"critic_layers={self.critic_layers} must be >= 1 (or None: every layer), e.g. --critic_layers 6.",
        )
        _require(
            not self.critic_lora_target_modules or all(self.critic_lora_target_modules),
            f"critic_lora_target_modules={self.critic_lora_target_modules} holds an empty name; pass module names "
            "such as q_proj v_proj.",
        )
        _require(self.value_lr > 0, f"value_lr={self.value_lr} must be > 0.")
        _require(self.value_epochs >= 0, f"value_epochs={self.value_epochs} must be >= 0 (0 freezes the critic).")
        if self.value_epochs == 0 and self.advantage_estimator == "gae":
            warnings.warn(
                "value_epochs=0: the critic never trains, so GAE's advantages keep its initial values as their "
                "baseline for the whole run. Set --value_epochs 4 (the default) unless that is the ablation you want.",
                stacklevel=3,
            )
        _require(self.value_minibatch_size >= 1, f"value_minibatch_size={self.value_minibatch_size} must be >= 1.")
        _require(
            self.value_clip_range is None or self.value_clip_range > 0,
            f"value_clip_range={self.value_clip_range} must be > 0, or None for an unclipped value loss.",
        )
        _require(self.lora_r >= 1, f"lora_r={self.lora_r} must be >= 1.")
        _require(
            self.lora_alpha > 0,
            f"lora_alpha={self.lora_alpha} must be > 0: the LoRA update is scaled by lora_alpha / lora_r, "
            "so 0 would freeze the policy (e.g. --lora_alpha 16).",
        )
        _require(
            not self.lora_target_modules or all(self.lora_target_modules),
            f"lora_target_modules={self.lora_target_modules} holds an empty name; pass module names such as q_proj v_proj.",
        )
        _require(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} must be in [0, 1).")
        _require(
            self.save_steps >= 0, f"save_steps={self.save_steps} must be >= 0 (0 disables intermediate checkpoints)."
        )
        _require(
            self.save_total_limit is None or self.save_total_limit >= 1,
            f"save_total_limit={self.save_total_limit} must be >= 1, or None to keep every checkpoint.",
        )
        _require(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1.")
        _require(
            self.held_out_kl_prompts >= 0,
            f"held_out_kl_prompts={self.held_out_kl_prompts} must be >= 0 (0: off), e.g. --held_out_kl_prompts 16.",
        )
        _require(
            self.reward_timeout is None or self.reward_timeout > 0,
            f"reward_timeout={self.reward_timeout} must be > 0 seconds, or None for no limit, e.g. --reward_timeout 600.",
        )
        _require(
            self.log_completions_steps >= 0,
            f"log_completions_steps={self.log_completions_steps} must be >= 0 (0: never).",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        """The config saved at `path` (a run's trainer_config.json); `ValueError` naming the file
        where it is not one, or is another algorithm's (a PPO run's file for `TRPOConfig`)."""
        try:
            saved = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a saved config (not JSON: {exc}).") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a saved config (an object of settings).")
        saved = without_removed_settings(saved, str(path))
        unknown = sorted(set(saved) - _field_names(cls))
        if unknown:
            owners = [c.__name__ for c in _config_classes() if c is not cls and set(saved) <= _field_names(c)]
            whose = f"a {owners[0]}'s: load it with {owners[0]}.load" if owners else "not one of this release's configs"
            raise ValueError(f"{path} sets {unknown}, which {cls.__name__} has no field for: the file is {whose}.")
        return cls(**saved)


def _field_names(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def _config_classes() -> list[type]:
    """RLConfig and every config class derived from it (each algorithm's)."""
    found, pending = [], [RLConfig]
    while pending:
        config_class = pending.pop()
        found.append(config_class)
        pending += config_class.__subclasses__()
    return found


def without_removed_settings(saved: dict, source: str) -> dict:
    """`saved` (a config's fields, from `source`) without the settings this release removed
    (`REMOVED_SETTINGS`): each one at its old default goes with a warning; any other value is a
    `ValueError` naming it."""
    removed = {k: v for k, v in saved.items() if k in REMOVED_SETTINGS}
    refused = {k: v for k, v in removed.items() if v != REMOVED_SETTINGS[k]}
    if refused:
        raise ValueError(
            f"{source} was saved with {refused}: settings this release removed (docs/results.md says why), at values "
            "other than their old defaults, so its run took an update this package no longer computes. Resume it "
            "with trpo_rlhf at commit 55f5382, or start a new run."
        )
    if removed:
        warnings.warn(
            f"{source} holds {sorted(removed)}, settings this release removed; they were at their old defaults and "
            "are ignored.",
            stacklevel=2,
        )
    return {k: v for k, v in saved.items() if k not in removed}
