"""Configuration dataclasses.

`RLConfig` holds the settings every on-policy RLHF trainer in this package shares (rollout, reward
shaping, GAE, value function, LoRA); `TRPOConfig` adds the trust-region solver. Both are plain
dataclasses, so recipes expose every field as a command-line flag through `HfArgumentParser`:

    >>> from trpo_rlhf import TRPOConfig
    >>> config = TRPOConfig(output_dir="runs/x", max_steps=50, max_kl=0.01)
    >>> config.cg_iters
    10
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


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
        _require(_matches(value, hint), f"{f.name}={value!r} must be {_type_name(hint)}, not {type(value).__name__} "
                 f"(e.g. {f.name}={f.default!r}).")
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            _require(math.isfinite(value), f"{f.name}={value} must be a finite number.")


@dataclass
class RLConfig:
    """Settings shared by the on-policy trainers (rollout, rewards, advantages, critic, LoRA).

    Defaults are the ones that train the sentiment task (`recipes/trpo_gpt2_sentiment.py`); the
    comment on each says where it comes from.
    """

    output_dir: str = field(default="runs/trpo", metadata={"help": "Where metrics.jsonl, checkpoints and the final adapter go."})
    seed: int = field(default=0, metadata={"help": "Seed for LoRA init, prompt order and sampling."})
    max_steps: int = field(default=100, metadata={"help": "Number of rollout + update iterations `train()` runs."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per iteration (per process)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Response length cap; generation stops earlier at EOS."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature. Every log-prob (old, new, reference, KL) is taken from softmax(logits/temperature), "
                  "exactly the distribution sampled from; no top-k/top-p truncation."},
    )
    # Reward shaping (Ziegler et al. 2019, eq. 2): r_t = -beta * (log pi - log pi_ref), score at the last token.
    init_kl_coef: float = field(default=0.05, metadata={"help": "beta, the per-token KL penalty to the reference (TRL PPO's kl_coef)."})
    target_kl_ref: float | None = field(
        default=None,
        metadata={"help": "Target of the adaptive KL controller, in nats per completion (sum over tokens). None keeps beta fixed. "
                  "Ziegler et al. use 6."},
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (in samples) of the adaptive KL controller (Ziegler et al.: 10000)."})
    # GAE (Schulman et al. 2016). gamma=1: the episode is one short completion, no discounting is needed.
    gamma: float = field(default=1.0, metadata={"help": "Discount over response tokens."})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda (TRL's default)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages to mean 0, std 1 over the valid tokens of the batch."})
    # Critic: its own LoRA adapter + scalar head on the shared frozen base, so it never moves the policy.
    value_lr: float = field(default=5e-4, metadata={"help": "Adam learning rate of the value adapter and head (a LoRA-sized rate)."})
    value_epochs: int = field(default=4, metadata={"help": "Epochs of value regression per iteration (TRL's 4 PPO epochs)."})
    value_minibatch_size: int = field(default=8, metadata={"help": "Sequences per value-update minibatch."})
    value_clip_range: float | None = field(
        default=0.2, metadata={"help": "Clip the value prediction to old value +- this in the loss (TRL's cliprange_value). None: plain MSE."}
    )
    # LoRA (Hu et al. 2021). Dropout only acts in the value update: every policy pass runs in eval mode
    # so the trust region measures one deterministic policy.
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the policy and value adapters."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (value adapter training only)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, e.g. q_proj v_proj. None: PEFT's default for the architecture "
                  "(q_proj,v_proj for Llama; c_attn for GPT-2)."},
    )
    save_steps: int = field(
        default=0,
        metadata={"help": "Save a resumable checkpoint-<step> every this many steps (0: none besides the final save and the "
                  "checkpoint written when a run is interrupted)."},
    )
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest this many checkpoint-<step> folders (None: all)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds a previous run's metrics or checkpoints, deleting them. "
                  "Without it such a run stops with an error (use --resume_from_checkpoint to continue the previous run)."},
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "Stop the run with an error after this many consecutive steps whose rewards, advantages, gradients, "
                  "CG solution or step were not finite (each such step is rejected and the policy and critic restored)."},
    )
    bf16: bool = field(
        default=False,
        metadata={"help": "Run the model's forwards (generation, rollout, updates) under bfloat16 autocast, for GPUs. "
                  "Logits are cast to float32 before any softmax, so log-probs, KLs, gradients, CG vectors and dot "
                  "products stay float32; the LoRA tensors stay float32."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        check_field_types(self)
        _require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1: set --batch_size to a positive number of prompts.")
        _require(self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1.")
        _require(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        _require(self.temperature > 0, f"temperature={self.temperature} must be > 0 (1.0 samples from the model's own distribution).")
        _require(self.init_kl_coef >= 0, f"init_kl_coef={self.init_kl_coef} must be >= 0 (0 disables the KL penalty).")
        _require(self.target_kl_ref is None or self.target_kl_ref > 0,
                 f"target_kl_ref={self.target_kl_ref} must be > 0, or None for a fixed KL coefficient.")
        _require(self.kl_horizon >= 1, f"kl_horizon={self.kl_horizon} must be >= 1.")
        _require(0.0 <= self.gamma <= 1.0, f"gamma={self.gamma} must be in [0, 1].")
        _require(0.0 <= self.gae_lambda <= 1.0, f"gae_lambda={self.gae_lambda} must be in [0, 1].")
        _require(self.value_lr > 0, f"value_lr={self.value_lr} must be > 0.")
        _require(self.value_epochs >= 0, f"value_epochs={self.value_epochs} must be >= 0 (0 freezes the critic).")
        _require(self.value_minibatch_size >= 1, f"value_minibatch_size={self.value_minibatch_size} must be >= 1.")
        _require(self.value_clip_range is None or self.value_clip_range > 0,
                 f"value_clip_range={self.value_clip_range} must be > 0, or None for an unclipped value loss.")
        _require(self.lora_r >= 1, f"lora_r={self.lora_r} must be >= 1.")
        _require(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0: the LoRA update is scaled by lora_alpha / lora_r, "
                 "so 0 would freeze the policy (e.g. --lora_alpha 16).")
        _require(not self.lora_target_modules or all(self.lora_target_modules),
                 f"lora_target_modules={self.lora_target_modules} holds an empty name; pass module names such as q_proj v_proj.")
        _require(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} must be in [0, 1).")
        _require(self.save_steps >= 0, f"save_steps={self.save_steps} must be >= 0 (0 disables intermediate checkpoints).")
        _require(self.save_total_limit is None or self.save_total_limit >= 1,
                 f"save_total_limit={self.save_total_limit} must be >= 1, or None to keep every checkpoint.")
        _require(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls(**json.loads(Path(path).read_text()))


FVP_METHODS = ("gauss_newton", "kl_hessian")


@dataclass
class TRPOConfig(RLConfig):
    """TRPO settings (Schulman et al. 2015, "Trust Region Policy Optimization", Appendix C).

    The update maximises the surrogate L(theta) = mean_t[ratio_t * A_t] subject to
    mean_t KL(pi_old || pi_theta) <= max_kl, over the policy LoRA tensors only:

    * ``max_kl`` (delta): 0.02 nats per token. The sentiment task moves visibly in 20 steps at
      this size while the measured KL stays within ``kl_tolerance * max_kl``.
    * ``cg_iters`` = 10 (the original TRPO code, SB3-contrib). Each iteration is one FVP, about a
      PPO epoch's cost, and buys more surrogate gain per step: on the embedded sentiment task 3
      iterations (an update as fast as TRL-default PPO's) buy 49 % of 10's gain, 15 buy 127 %
      (README, "A cheap trust-region update"; recipes/step_quality.py).
    * ``cg_damping`` = 1e-3, not the classic 0.1: the Fisher of LoRA tensors is tiny (on
      SmolLM2-135M, v^T F v / v^T v is ~1.5e-4 in a random direction, ~3 at the top eigenvalue),
      so c = 0.1 dominates F and the step realises only ~20 % of max_kl (~40 % at 1e-2). At 1e-3 the measured KL of a full step is 0.7-1.4 x max_kl,
      the quadratic model holding. The damping also keeps the system definite in the LoRA A-block,
      whose Fisher is zero at init (B = 0).
    * ``backtrack_coef`` = 0.8 (SB3-contrib) rather than the paper's 0.5: finer steps lose less of
      a good direction when the quadratic model overestimates.
    * ``accept_ratio`` = 0.1: a step must realise at least 10 % of the improvement predicted by
      the linear model (Schulman's ``linesearch``), as well as any improvement at all.
    * ``fvp_subsample`` = 1.0: the Fisher is estimated on all sequences, on the very forward that
      gives the gradient. The paper used 10 %. On the embedded sentiment task, 0.25 takes the
      update's memory below PPO's, but the Fisher of 4 sequences underestimates the curvature along
      its own solution ~4x (the line search cuts the step back) and the step buys 44 % of the
      default's surrogate gain in 58 % of its time, less than fewer CG iterations buy in that time
      (README, "A cheap trust-region update"): lower it when memory, not step quality, is the limit.
    * ``fvp_method`` = "gauss_newton": F v = J^T M J v, one tangent pass and one backward per
      product (2.4 s against 3.5 s for "kl_hessian", the double backward, on that task).
    """

    max_kl: float = field(default=0.02, metadata={"help": "delta: bound on the mean per-token KL(pi_old || pi_new) of one update."})
    kl_tolerance: float = field(default=1.5, metadata={"help": "Accept a line-search point only if measured KL <= kl_tolerance * max_kl."})
    cg_iters: int = field(default=10, metadata={"help": "Conjugate-gradient iterations (Fisher-vector products) per update."})
    cg_damping: float = field(default=1e-3, metadata={"help": "Damping c added to the Fisher: (F + c I) x = g."})
    cg_residual_tol: float = field(default=1e-10, metadata={"help": "Stop CG once r.r < cg_residual_tol * g.g (relative squared residual)."})
    line_search_steps: int = field(default=10, metadata={"help": "Backtracking attempts before the step is rejected."})
    backtrack_coef: float = field(default=0.8, metadata={"help": "Step fraction decay per backtracking attempt, in (0, 1)."})
    accept_ratio: float = field(default=0.1, metadata={"help": "Required ratio of realised to linearly predicted improvement."})
    fvp_subsample: float = field(default=1.0, metadata={"help": "Fraction of the batch's sequences used for Fisher-vector products."})
    fvp_method: str = field(default="gauss_newton", metadata={
        "help": "How F v is computed: 'gauss_newton' (J^T M J v, two passes over one retained graph) or "
                "'kl_hessian' (double backward through the KL gradient). Both are the exact Fisher at theta_old."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.max_kl > 0 and math.isfinite(self.max_kl),
                 f"max_kl={self.max_kl} must be a positive number of nats per token, e.g. --max_kl 0.01.")
        _require(self.kl_tolerance >= 1.0, f"kl_tolerance={self.kl_tolerance} must be >= 1 (1.5 allows the usual quadratic-model error).")
        _require(self.cg_iters >= 1, f"cg_iters={self.cg_iters} must be >= 1: conjugate gradient needs at least one iteration, e.g. --cg_iters 10.")
        _require(self.cg_damping >= 0, f"cg_damping={self.cg_damping} must be >= 0.")
        _require(self.cg_residual_tol >= 0, f"cg_residual_tol={self.cg_residual_tol} must be >= 0.")
        _require(self.line_search_steps >= 1, f"line_search_steps={self.line_search_steps} must be >= 1.")
        _require(0.0 < self.backtrack_coef < 1.0,
                 f"backtrack_coef={self.backtrack_coef} must lie strictly between 0 and 1, e.g. --backtrack_coef 0.8 (or 0.5).")
        _require(self.accept_ratio >= 0, f"accept_ratio={self.accept_ratio} must be >= 0 (0 accepts any improvement).")
        _require(0.0 < self.fvp_subsample <= 1.0, f"fvp_subsample={self.fvp_subsample} must be in (0, 1].")
        _require(self.fvp_method in FVP_METHODS,
                 f"fvp_method={self.fvp_method!r} is not one of {FVP_METHODS}; use 'gauss_newton' (faster) or 'kl_hessian'.")
