"""The engine every on-policy trainer here shares: `RLTrainer` runs the rollout, the rewards and
their shaping, the advantages (GAE and its critic, or GRPO's and RLOO's group baselines), logging,
checkpoints and exact resume; a subclass adds only its `policy_update` (`trpo.TRPOTrainer`,
`ppo.PPOTrainer`).

    >>> from trpo_rlhf import TRPOConfig, TRPOTrainer
    >>> config = TRPOConfig(output_dir="runs/x", max_steps=50, batch_size=16, max_new_tokens=24)
    >>> trainer = TRPOTrainer(config=config, model="embedded", reward_fn="vader",
    ...                       train_dataset=["This movie", "I went to see"])        # doctest: +SKIP
    >>> trainer.train()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
from collections.abc import Callable, Sequence

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from .actor_critic import LoraActorCritic, base_model_of
from .advantages import (
    explained_variance,
    gae,
    group_advantages,
    kl_controller,
    masked_mean,
    masked_whiten,
    sequence_kl,
    token_rewards,
    value_loss,
)
from .config import RLConfig
from .loading import (
    cast_frozen_base,
    ensure_pad_token,
    load_causal_lm,
    model_fingerprint,
    tokenizer_fingerprint,
)
from .metrics import UpdateCosine
from .processes import Collectives, use_cpu_accelerator
from .profiling import PhaseTimer, peak_memory_mb
from .rewards import RewardFn, RewardFunctions, RewardInputs
from .rollout import Rollout, evaluate_rollout, gather_tokens, log_softmax_, sample_completions
from .run_directory import RunDirectory, check_output_dir_path
from .run_state import CheckpointedRun, TrainingState
from .setup_checks import SetupChecks
from .sharding import shard_frozen_base
from .tracking import RunTrackers, tracker_names
from .trust_region import KL_CHUNK_POSITIONS, categorical_kl, flat_concat

HELD_OUT_SEED_STRIDE = 1_000_003  # a prime above any step count: (seed, step) pairs map to distinct seeds


class NonFiniteUpdate(Exception):
    """Raised inside a step when a quantity of its update is not finite; the step is then rejected."""

    def __init__(self, quantity: str):
        super().__init__(quantity)
        self.quantity = quantity


class NonFiniteError(RuntimeError):
    """The run stopped: `max_nonfinite_steps` consecutive steps had non-finite updates."""


def require_finite(quantity: str, *tensors: torch.Tensor | None) -> None:
    """Raise `NonFiniteUpdate(quantity)` unless every given tensor is finite."""
    if not all(t is None or bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteUpdate(quantity)


class RLTrainer(SetupChecks, CheckpointedRun, Collectives):
    """Shared engine: prompts -> rollout -> scores -> token rewards -> advantages (GAE with the
    critic, or a group baseline without one) -> policy update (subclass) -> critic update ->
    metrics, with exact resume and atomic checkpoints. Subclasses implement `policy_update(batch)`.

    Args:
        config: an `RLConfig` subclass.
        model: a hub id, a local path, "embedded", a `PreTrainedModel` (a LoRA policy adapter is
            added from the config) or a `PeftModel` (its active adapter is the policy).
        tokenizer: the policy's tokenizer; loaded with the model when None. A missing pad token is
            set to EOS.
        reward_fn: callable(prompts, completions) -> list[float] on texts, "vader" (the default), or
            the hub id / path of a sequence classifier.
        train_dataset: a list of prompts, a `datasets.Dataset` or a dict of columns with a "prompt"
            column; a prompt is a string or a list of chat messages (TRL's conversational format,
            given the tokenizer's chat template). The other columns reach `reward_funcs` (but
            `completion` and `completion_ids`, as in TRL).
        reward_funcs: instead of `reward_fn`, TRL's reward functions: a callable
            f(prompts, completions, **kwargs), "vader", a classifier's id or path, or a list of
            them, weighted by `config.reward_weights` (`rewards.RewardFunctions`).
    """

    progress_name = "train"

    def __init__(
        self,
        config: RLConfig,
        model: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        reward_fn: RewardFn | str | None = None,
        train_dataset: Sequence[str] | object = (),
        reward_funcs: object | None = None,
    ):
        self.config = config
        self.output_dir = check_output_dir_path(config.output_dir)
        self.run_directory = RunDirectory(self.output_dir)
        self.run_directory.check_ours()  # before anything is written or loaded
        self.run_directory.check_writable()
        self.accelerator = Accelerator(
            cpu=use_cpu_accelerator(),
            log_with=tracker_names(config.report_to) or None,
            project_dir=str(self.output_dir),
        )
        self._check_distributed_type()
        self.trackers = RunTrackers(self.accelerator, config.run_name or self.output_dir.name, config.to_dict())
        self.device = self.accelerator.device
        set_seed(config.seed)  # identical LoRA initialisation on every process

        model_dtype = getattr(torch, config.model_dtype)
        if isinstance(model, str):
            model, loaded_tokenizer = load_causal_lm(model, dtype=model_dtype)
            tokenizer = tokenizer or loaded_tokenizer
        cast_frozen_base(model, model_dtype)
        if tokenizer is None:
            tokenizer = self._tokenizer_for(model)
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer, base_model_of(model))
        self._check_vocabulary(model)
        # What a checkpoint must have been saved with (checked on resume), taken before any sharding.
        self.fingerprints = {
            "base_model": model_fingerprint(base_model_of(model)),
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }

        self.prompts = self._validate_prompts(train_dataset, model)
        self._check_held_out_prompts()
        self.actor_critic = LoraActorCritic.build(model, config)
        if self.sharded:
            shard_frozen_base(
                self.actor_critic.peft_model, self.actor_critic.trainable_tensors().values(), self.device.type
            )
        self.actor_critic.to(self.device)
        self.reward_functions = RewardFunctions.of_trainer(reward_fn, reward_funcs, config.reward_weights, self.device)
        # The text reward f(prompts, completions) of a run without reward_funcs (evaluations call it).
        self.reward_fn = self.reward_functions.functions[0] if reward_funcs is None else None
        self.kl_ctl = kl_controller(config.init_kl_coef, config.target_kl_ref, config.kl_horizon)
        self.value_optimizer = (
            torch.optim.Adam(self.actor_critic.value_parameters(), lr=config.value_lr)
            if self.actor_critic.has_critic
            else None
        )

        # Prompt order is shared by all processes (same seed); sampling noise differs per process.
        self.prompt_generator = torch.Generator().manual_seed(config.seed)
        self.minibatch_generator = torch.Generator().manual_seed(config.seed + 1)
        torch.manual_seed(config.seed + self.accelerator.process_index)
        self._prompt_order: list[int] = []
        self._batch_prompt_indices: list[int] = []
        self._batch_rows: list[int] = []  # this process's dataset rows, one per completion
        self.global_step = 0
        self.nonfinite_streak = 0
        self.run_id: str | None = None  # output_dir's run, once claimed or resumed (main process)
        self._output_dir_taken = False  # on every process, once claimed or resumed
        self._saved_step = 0  # the step of the last checkpoint saved or loaded
        # The state at the end of the last completed step: a failed or non-finite step rolls back to it.
        self._completed_state: TrainingState | None = None
        self.policy_update_cosine = UpdateCosine()
        # Functions of the trainer called at the end of each step, after its updates; their metrics
        # join the step's (e.g. `experiments.exact.ExactEvaluator`: the exact reward and KL). They
        # must draw no random numbers, so that a run is the same with or without them.
        self.metric_hooks: list[Callable[[RLTrainer], dict[str, float]]] = []

    def _check_shardable(self) -> None:
        """Settings a sharded base cannot run refuse here, before anything is loaded."""

    def _next_prompts(self) -> list[str]:
        """This process's prompts of the next step, each `num_generations` times in a row (a group)."""
        world, rank, generations = (
            self.accelerator.num_processes,
            self.accelerator.process_index,
            self.config.num_generations,
        )
        batch = self.config.batch_size // generations
        while len(self._prompt_order) < world * batch:
            self._prompt_order += torch.randperm(len(self.prompts), generator=self.prompt_generator).tolist()
        take, self._prompt_order = self._prompt_order[: world * batch], self._prompt_order[world * batch :]
        self._batch_prompt_indices = take
        self._batch_rows = [i for i in take[rank * batch : (rank + 1) * batch] for _ in range(generations)]
        return [self.prompts[i] for i in self._batch_rows]

    def _held_out_seed(self) -> int:
        # A seed of the run's seed and the step alone, so a resumed run holds out what the
        # uninterrupted one did without a generator state in its checkpoints.
        return (self.config.seed * HELD_OUT_SEED_STRIDE + self.global_step) % 2**63

    def _held_out_prompts(self) -> list[str]:
        """This process's `held_out_kl_prompts` prompts, drawn without replacement from those outside
        the step's batch (every process's)."""
        rank, count = self.accelerator.process_index, self.config.held_out_kl_prompts
        in_batch = set(self._batch_prompt_indices)
        outside = [i for i in range(len(self.prompts)) if i not in in_batch]
        chosen = torch.randperm(len(outside), generator=torch.Generator().manual_seed(self._held_out_seed()))
        return [self.prompts[outside[i]] for i in chosen[rank * count : (rank + 1) * count].tolist()]

    @torch.no_grad()
    def sample_held_out(self) -> tuple[Rollout, torch.Tensor]:
        """Completions of pi_old for prompts outside the step's batch, and pi_old's log-probs over the
        vocabulary at their response positions, for `policy/kl_held_out`. They are sampled on a
        forked random state, so the training stream, and the run, stay those of a run without them."""
        prompts = self._held_out_prompts()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self._held_out_seed() + self.accelerator.process_index)
            rollout, _ = self._sample(prompts)
        return rollout, self.policy_log_probs(rollout)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[str]) -> list[str]:
        """Sample one completion per prompt from the current policy."""
        return self._sample(prompts)[0].completions

    def _sample(self, prompts: list[str], return_scores: bool = False) -> tuple[Rollout, torch.Tensor | None]:
        with self.actor_critic.autocast():
            return sample_completions(
                self.actor_critic.peft_model,
                self.tokenizer,
                prompts,
                self.config.max_new_tokens,
                self.config.temperature,
                return_scores=return_scores,
                static_cache_length=(
                    self.longest_prompt_tokens + self.config.max_new_tokens if self.config.compile_generation else None
                ),
                add_special_tokens=self.add_special_tokens,
            )

    def collect_batch(self, timer: PhaseTimer | None = None) -> tuple[Rollout, dict[str, float]]:
        """Sample completions for the next prompts, score them, run the no-grad rollout forwards
        (old and reference log-probs, values) and compute rewards and advantages: everything of a
        step before the updates. `timer` receives the generate/score/rollout_forward phases."""
        cfg = self.config
        timer = timer or PhaseTimer()
        prompts = self._next_prompts()
        with timer("generate"):
            # The distributions sampled from are the old policy's (evaluate_rollout), unless the
            # critic needs the policy forward's hidden states anyway.
            rollout, sampling_logits = self._sample(prompts, return_scores=True)
        with timer("score"):
            completion_ids = [
                ids[: int(n)].tolist() for ids, n in zip(rollout.response_ids, rollout.response_mask.sum(1))
            ]
            scores, reward_stats = self.score(self._batch_rows, rollout.completions, completion_ids)
        with timer("rollout_forward"):
            rollout = evaluate_rollout(self.actor_critic, rollout, cfg.temperature, sampling_logits)
            del sampling_logits
        batch, stats = self._advantages(dataclasses.replace(rollout, scores=scores))
        return batch, {**reward_stats, **stats}

    def score(
        self, rows: list[int], completions: list[str], completion_ids: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The scores [B] (on the device) of `completions` of the dataset's `rows` and, with
        `reward_funcs`, each function's mean over every process's completions as `reward/<name>`.
        The functions see the dataset's own prompts (chat messages for a conversational one, the
        completion then as one assistant message) and its other columns of those rows."""
        inputs = RewardInputs.of_rows(
            rows,
            self.prompts,
            self.prompt_messages,
            self.prompt_columns,
            completions,
            completion_ids or [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions],
        )
        trainer_state = types.SimpleNamespace(global_step=self.global_step, max_steps=self.config.max_steps)
        scores, each = self.reward_functions(inputs, self.global_step, self.config.reward_timeout, trainer_state)
        if self.reward_fn is not None:  # one text reward: its scores are reward/mean
            return scores.to(self.device), {}
        stats = {
            f"reward/{name}": self.accelerator.gather(s.to(self.device)).nanmean().item() for name, s in each.items()
        }
        return scores.to(self.device), stats

    def step(self) -> dict[str, float]:
        """One iteration on the next prompt batch; returns (and logs) its metrics.

        If a reward, advantage, gradient, CG solution or step is not finite, the step's updates are
        rejected: the policy and critic are restored bitwise to the previous step's, a warning
        names the quantity, and `max_nonfinite_steps` such steps in a row raise `NonFiniteError`.
        """
        cfg = self.config
        if not self._output_dir_taken:
            # Outside train() (a loop of the caller's own): the first step claims output_dir, unlocked.
            self._take_output_dir(None, resuming=False)
        if self._completed_state is None:
            self._completed_state = self.capture_state()
        timer = PhaseTimer()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with timer("step"):
            batch, shaping_stats = self.collect_batch(timer)
            held_out = None
            if cfg.held_out_kl_prompts:
                with timer("held_out_kl"):
                    held_out = self.sample_held_out()
            try:
                self._require_finite_batch(batch)
                policy_before = self._flat_policy()
                with timer("policy_update"):
                    policy_stats = self.policy_update(batch)
                policy_stats.update(self._update_cosine(policy_before))
                if held_out is not None:
                    with timer("held_out_kl"):
                        policy_stats["policy/kl_held_out"] = self.completion_kl(*held_out)
                    held_out = None  # its [B, T, V] log-probs, before the critic's update needs the memory
                value_stats = {}
                if self.actor_critic.has_critic:
                    with timer("value_update"):
                        value_stats = self.value_update(batch)
                require_finite("trainable tensors after the update", *self.actor_critic.trainable_tensors().values())
                self.nonfinite_streak = 0
            except NonFiniteUpdate as exc:
                self._reject_nonfinite_step(exc.quantity)
                policy_stats, value_stats = {}, {}
            if math.isfinite(shaping_stats["kl/ref"]):
                self.kl_ctl.update(shaping_stats["kl/ref"], cfg.batch_size * self.accelerator.num_processes)

        all_scores = self.accelerator.gather(batch.scores)
        stats = {
            "step": self.global_step + 1,
            "reward/mean": all_scores.mean().item(),
            "reward/std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            **shaping_stats,
            **policy_stats,
            **value_stats,
            "update/nonfinite": float(self.nonfinite_streak > 0),
            "policy/entropy": self.reduce_mean(masked_mean(batch.entropy, batch.response_mask)).item(),
            "response/length_mean": self.reduce_mean(batch.response_mask.sum(1).mean()).item(),
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            "memory/peak_mb": peak_memory_mb(self.device),
        }
        for hook in self.metric_hooks:
            stats.update(hook(self))
        self.global_step += 1
        self._completed_state = self.capture_state()
        self._log(stats)
        self.trackers.log_metrics(stats, self.global_step)
        if cfg.log_completions_steps and self.global_step % cfg.log_completions_steps == 0:
            self.trackers.log_completions(batch.prompts, batch.completions, batch.scores.tolist(), self.global_step)
        return stats

    def _flat_policy(self) -> torch.Tensor:
        return flat_concat([p.detach() for p in self.actor_critic.policy_parameters()]).clone()

    def _update_cosine(self, policy_before: torch.Tensor) -> dict[str, float]:
        """`policy/update_cosine`: the cosine between this update's change of the policy's LoRA
        tensors and the last completed one's (absent on a run's first step). Below 0 the updates
        undo each other, and the KL to the reference grows slower than their own KLs add up."""
        cosine = self.policy_update_cosine(self._flat_policy() - policy_before)
        return {} if cosine is None else {"policy/update_cosine": cosine}

    def _require_finite_batch(self, batch: Rollout) -> None:
        local = {"reward": batch.scores, "advantage": batch.advantages, "return": batch.returns}
        broken = [name for name, tensor in local.items() if not bool(torch.isfinite(tensor).all())]
        # Each process checks its own shard; all must agree to reject, or the collectives diverge.
        if self.any_process(bool(broken)):
            raise NonFiniteUpdate(broken[0] if broken else "reward, advantage or return on another process")

    def _reject_nonfinite_step(self, quantity: str) -> None:
        self.restore_state(self._completed_state, rng=False)
        self.nonfinite_streak += 1
        step, limit = self.global_step + 1, self.config.max_nonfinite_steps
        message = (
            f"Step {step}: non-finite {quantity}; the step's updates are rejected and the policy and critic restored "
            f"to step {self.global_step} ({self.nonfinite_streak} such step(s) in a row, the run stops at {limit})."
        )
        if self.nonfinite_streak >= limit:
            raise NonFiniteError(
                f"{message} Stopping: check the reward's scale and finiteness, or lower the learning rates."
            )
        warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ shared pieces
    def _advantages(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        cfg = self.config
        mask = rollout.response_mask
        kl_coef = self.kl_ctl.value
        rewards = token_rewards(rollout.scores, rollout.logp_old - rollout.logp_ref, mask, kl_coef)
        kl_ref = self.reduce_mean(sequence_kl(rollout.logp_old, rollout.logp_ref, mask).mean()).item()
        stats = {"kl/ref": kl_ref, "kl/coef": kl_coef}
        if cfg.advantage_estimator == "gae":
            advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.gae_lambda)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            stats["value/explained_variance"] = explained_variance(rollout.values, returns, mask)
        else:
            advantages, returns = group_advantages(
                rewards, mask, cfg.num_generations, cfg.advantage_estimator, cfg.gamma, cfg.scale_rewards
            )
        return dataclasses.replace(rollout, advantages=advantages, returns=returns), stats

    def value_update(self, batch: Rollout) -> dict[str, float]:
        """Minibatch Adam on the (clipped) value loss towards the GAE returns. Only the critic's
        adapter and head are in the optimizer, and the policy adapter is inactive and frozen during
        these passes, so the policy tensors cannot move."""
        cfg = self.config
        params = self.actor_critic.value_parameters()
        losses = []
        with self.actor_critic.critic_training():
            for _ in range(cfg.value_epochs):
                order = torch.randperm(len(batch), generator=self.minibatch_generator)
                for start in range(0, len(batch), cfg.value_minibatch_size):
                    mini = batch.select(order[start : start + cfg.value_minibatch_size])
                    values = self.actor_critic.values(**mini.model_inputs(), features=mini.features).float()
                    loss = value_loss(values, mini.values, mini.returns, mini.response_mask, cfg.value_clip_range)
                    self.value_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.average_gradients(params)
                    require_finite("value gradient", *(p.grad for p in params))
                    self.value_optimizer.step()
                    losses.append(loss.item())
        return {"value/loss": sum(losses) / len(losses) if losses else float("nan")}

    def policy_update(self, batch: Rollout) -> dict[str, float]:
        raise NotImplementedError

    def policy_logits(self, batch: Rollout) -> torch.Tensor:
        """Logits / temperature of pi_theta at every response position: [B, T, V], float32."""
        return self.actor_critic.policy_logits(**batch.model_inputs(), temperature=self.config.temperature)

    def policy_log_probs(self, batch: Rollout) -> torch.Tensor:
        """log pi_theta(. | s_t) over the vocabulary at every response position: [B, T, V]. Without
        a graph the log-softmax is taken in place, so the logits are the only [B, T, V] copy."""
        logits = self.policy_logits(batch)
        return torch.log_softmax(logits, dim=-1) if torch.is_grad_enabled() else log_softmax_(logits)

    @staticmethod
    def surrogate(batch: Rollout, logp: torch.Tensor) -> torch.Tensor:
        """L = mean over valid tokens of exp(logp_theta - logp_old) * A_t (Schulman et al. 2015, eq. 14),
        `logp` the log-probs of the taken tokens."""
        return masked_mean(torch.exp(logp - batch.logp_old) * batch.advantages, batch.response_mask)

    @torch.no_grad()
    def measure_policy_change(self, batch: Rollout, logp_all_old: torch.Tensor) -> tuple[float, float]:
        """(L(theta) - L(theta_old), the update's KL per completion, `completion_kl`) on `batch`, from
        one forward at the current parameters, averaged across processes. TRPO's line search
        (`trpo/kl`, `trpo/surrogate_gain`) and PPO's `ppo/kl` and `ppo/surrogate_gain` all come from
        here, so the two updates are measured alike."""
        logp_all = self.policy_log_probs(batch)
        actions = batch.response_ids
        gain = self.surrogate(batch, gather_tokens(logp_all, actions)) - self.surrogate(
            batch, gather_tokens(logp_all_old, actions)
        )
        return self.reduce_mean(gain).item(), self.completion_kl(batch, logp_all_old, logp_all)

    @torch.no_grad()
    def completion_kl(self, batch: Rollout, logp_all_old: torch.Tensor, logp_all: torch.Tensor | None = None) -> float:
        """The KL(pi_old || pi_theta) of a completion, the exact KL over the vocabulary summed over
        its tokens (the chain rule), averaged over `batch`'s completions and across processes: the
        unit of `kl/ref` and of the budgets a run is judged at. `logp_all` from a forward at the
        current parameters unless given."""
        kl = (self.token_kl(batch, logp_all_old, logp_all) * batch.response_mask).sum() / len(batch)
        return self.reduce_mean(kl).item()

    def tokens_per_completion(self, batch: Rollout) -> float:
        """Valid tokens per completion in `batch`, averaged across processes: the factor between a
        mean per-token KL (whose Fisher the trust region's products compute) and `completion_kl`."""
        return self.reduce_mean(batch.response_mask.sum() / len(batch)).item()

    @torch.no_grad()
    def token_kl(
        self, batch: Rollout, logp_all_old: torch.Tensor, logp_all: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The exact KL(pi_old || pi_theta) over the vocabulary at each of `batch`'s positions ([B, T],
        this process's); `logp_all` from a forward at the current parameters unless given."""
        if logp_all is None:
            logp_all = self.policy_log_probs(batch)
        return categorical_kl(logp_all_old, logp_all, chunk_size=KL_CHUNK_POSITIONS)

    def _progress_fields(self, stats: dict[str, float]) -> dict[str, str]:
        return {}
