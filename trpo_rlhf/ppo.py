"""PPO-clip (Schulman et al. 2017) on the same engine as TRPO: the rollout, reward shaping,
advantages and critic are `RLTrainer`'s; only `policy_update` differs, so a comparison isolates
the policy update.

    >>> from trpo_rlhf import PPOConfig, PPOTrainer
    >>> config = PPOConfig(output_dir="runs/ppo", max_steps=50, ppo_epochs=4, clip_range=0.2)
    >>> trainer = PPOTrainer(config=config, model="embedded", reward_fn="vader",
    ...                      train_dataset=["This movie"])                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .advantages import masked_mean
from .config import RLConfig, _require
from .engine import RLTrainer, require_finite
from .metrics import UpdateCosine
from .profiling import PhaseTimer
from .rollout import Rollout, token_logprobs


@dataclass
class PPOConfig(RLConfig):
    """PPO settings. Each default mirrors TRL's PPO (`trl.experimental.ppo.PPOConfig`, trl 1.12):

    * ``ppo_epochs`` = 4: TRL's ``num_ppo_epochs``;
    * ``num_minibatches`` = 1: TRL's ``num_mini_batches``;
    * ``clip_range`` = 0.2: TRL's ``cliprange``;
    * ``max_grad_norm`` = 1.0: TRL's (transformers.TrainingArguments') ``max_grad_norm``;
    * ``target_kl`` = None: TRL's PPO has no early stop; set it to stop the epochs once the
      measured KL(pi_old || pi_new) exceeds it;
    * ``learning_rate`` = 5e-5: TRL's (transformers.TrainingArguments') ``learning_rate``, a
      full-model rate; LoRA tensors usually want 1e-4 to 1e-3 (the toy task learns at 1e-3).

    The shared fields keep TRL's values too: init_kl_coef 0.05 (``kl_coef``), value_clip_range
    0.2 (``cliprange_value``), gamma 1.0, gae_lambda 0.95 (``lam``). The critic has its own
    optimizer here rather than TRL's joint loss with ``vf_coef``, exactly as in TRPO.
    """

    learning_rate: float = field(default=5e-5, metadata={"help": "Adam learning rate of the policy LoRA tensors."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over the batch per iteration (TRL's num_ppo_epochs)."})
    num_minibatches: int = field(default=1, metadata={"help": "Minibatches per epoch (TRL's num_mini_batches)."})
    clip_range: float = field(default=0.2, metadata={"help": "epsilon of the clipped ratio (TRL's cliprange)."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the policy gradient norm (None: no clipping)."}
    )
    target_kl: float | None = field(
        default=None,
        metadata={"help": "Stop the epochs early once the measured KL(pi_old || pi_new) per completion exceeds this."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0.")
        _require(self.ppo_epochs >= 1, f"ppo_epochs={self.ppo_epochs} must be >= 1.")
        _require(
            1 <= self.num_minibatches <= self.batch_size,
            f"num_minibatches={self.num_minibatches} must be between 1 and batch_size={self.batch_size}.",
        )
        _require(self.clip_range > 0, f"clip_range={self.clip_range} must be > 0, e.g. --clip_range 0.2.")
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm={self.max_grad_norm} must be > 0 or None.",
        )
        _require(self.target_kl is None or self.target_kl > 0, f"target_kl={self.target_kl} must be > 0 or None.")


def clipped_surrogate_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-mean_t min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t) over valid tokens (Schulman et al. 2017,
    eq. 7), and the fraction of tokens whose ratio was clipped."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


class PPOTrainer(RLTrainer):
    """PPO-clip over the policy LoRA tensors, with the constructor, `train()`, `step()` and
    `save_pretrained()` of `TRPOTrainer`."""

    progress_name = "PPO"

    def __init__(self, config: PPOConfig, *args, **kwargs):
        if not isinstance(config, PPOConfig):
            raise TypeError(f"PPOTrainer needs a PPOConfig, got {type(config).__name__}.")
        super().__init__(config, *args, **kwargs)
        self.policy_optimizer = torch.optim.Adam(self.actor_critic.policy_parameters(), lr=config.learning_rate)

    def optimizers(self) -> dict[str, torch.optim.Optimizer | UpdateCosine]:
        return super().optimizers() | {"policy": self.policy_optimizer}

    def policy_update(self, batch: Rollout) -> dict[str, float]:
        cfg: PPOConfig = self.config
        params = self.actor_critic.policy_parameters()
        timer = PhaseTimer()
        with torch.no_grad():
            logp_all_old = self.policy_log_probs(batch)  # pi_old over the vocabulary, for ppo/kl
        losses, clip_fractions, epochs_run = [], [], 0
        minibatch_size = -(-len(batch) // cfg.num_minibatches)
        for _ in range(cfg.ppo_epochs):
            with timer("epochs"):
                order = torch.randperm(len(batch), generator=self.minibatch_generator)
                for start in range(0, len(batch), minibatch_size):
                    mini = batch.select(order[start : start + minibatch_size])
                    logits = self.policy_logits(mini)
                    logp = token_logprobs(logits, mini.response_ids)
                    loss, clip_fraction = clipped_surrogate_loss(
                        logp, mini.logp_old, mini.advantages, mini.response_mask, cfg.clip_range
                    )
                    del logits
                    self.policy_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.average_gradients(params)
                    require_finite("policy gradient", *(p.grad for p in params))
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    self.policy_optimizer.step()
                    losses.append(loss.item())
                    clip_fractions.append(clip_fraction.item())
            epochs_run += 1
            if cfg.target_kl is not None:
                gain, kl = self.measure_policy_change(batch, logp_all_old)
                if kl > cfg.target_kl:
                    break
        if cfg.target_kl is None:
            with timer("measure_kl"):
                gain, kl = self.measure_policy_change(batch, logp_all_old)
        return {
            "ppo/kl": kl,
            # L(theta_new) - L(theta_old) of TRPO's surrogate, measured as TRPO measures its step.
            "ppo/surrogate_gain": gain,
            "ppo/clipfrac": sum(clip_fractions) / len(clip_fractions),
            "ppo/epochs_run": float(epochs_run),
            "ppo/policy_loss": sum(losses) / len(losses),
            **{f"time/policy_{k}": v for k, v in timer.seconds.items()},
        }

    def _progress_fields(self, stats: dict[str, float]) -> dict[str, str]:
        if "ppo/kl" not in stats:  # a step rejected for a non-finite value
            return {"nonfinite": "rejected"}
        return {"ppo_kl": f"{stats['ppo/kl']:.4f}", "clip": f"{stats['ppo/clipfrac']:.2f}"}
