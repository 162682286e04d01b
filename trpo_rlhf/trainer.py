"""The training loop. `RLTrainer` is the engine every on-policy trainer here shares (rollout, reward
shaping, GAE, critic, logging, checkpoints); `TRPOTrainer` adds only its policy update.

    >>> from trpo_rlhf import TRPOConfig, TRPOTrainer
    >>> config = TRPOConfig(output_dir="runs/x", max_steps=50, batch_size=16, max_new_tokens=24)
    >>> trainer = TRPOTrainer(config=config, model="embedded", reward_fn="vader",
    ...                       train_dataset=["This movie", "I went to see"])        # doctest: +SKIP
    >>> trainer.train()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from .advantages import (
    explained_variance,
    gae,
    kl_controller,
    masked_mean,
    masked_whiten,
    sequence_kl,
    token_rewards,
    value_loss,
)
from .config import RLConfig, TRPOConfig
from .models import LoraActorCritic, base_model_of, context_length, double_backward_attention, ensure_pad_token, load_causal_lm
from .prompts import prompts_from_dataset
from .rewards import RewardFn, build_reward_fn, score_batch
from .rollout import Rollout, evaluate_rollout, gather_tokens, sample_completions, token_logprobs
from .trust_region import (
    DampedFisherProduct,
    LinearizedLogits,
    backtracking_line_search,
    categorical_kl,
    cg_solve,
    fisher_vector_product,
    flat_grad,
    gauss_newton_fvp,
)

METRICS_FILE = "metrics.jsonl"
KL_CHUNK_POSITIONS = 64  # positions per chunk of the no-grad KL: [64, V] temporaries, ~12 MB at V = 49k


@torch.no_grad()
def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in place (no graph): logits - logsumexp(logits)."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


class PhaseTimer:
    """Wall-clock seconds per named phase, for the `time/*` metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class RLTrainer:
    """Shared engine: prompts -> rollout -> scores -> token rewards -> GAE -> policy update
    (subclass) -> critic update -> metrics. Subclasses implement `policy_update(batch)`.

    Args:
        config: an `RLConfig` subclass.
        model: a hub id, a local path, "embedded", a `PreTrainedModel` (a LoRA policy adapter is
            added from the config) or a `PeftModel` (its active adapter is the policy).
        tokenizer: the policy's tokenizer; loaded with the model when None. A missing pad token is
            set to EOS.
        reward_fn: callable(prompts, completions) -> list[float], "vader", or the hub id / path of
            a sequence classifier.
        train_dataset: a list of prompt strings or a `datasets.Dataset` with a "prompt" column.
    """

    progress_name = "train"

    def __init__(
        self,
        config: RLConfig,
        model: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        reward_fn: RewardFn | str = "vader",
        train_dataset: Sequence[str] | object = (),
    ):
        self.config = config
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        set_seed(config.seed)  # identical LoRA initialisation on every process

        if isinstance(model, str):
            model, loaded_tokenizer = load_causal_lm(model)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            tokenizer = self._tokenizer_for(model)
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer, base_model_of(model))

        self.prompts = self._validate_prompts(train_dataset, model)
        self.actor_critic = LoraActorCritic.build(model, config).to(self.device)
        self.reward_fn = build_reward_fn(reward_fn, device=self.device)
        self.kl_ctl = kl_controller(config.init_kl_coef, config.target_kl_ref, config.kl_horizon)
        self.value_optimizer = torch.optim.Adam(self.actor_critic.value_parameters(), lr=config.value_lr)

        # Prompt order is shared by all processes (same seed); sampling noise differs per process.
        self.prompt_generator = torch.Generator().manual_seed(config.seed)
        self.minibatch_generator = torch.Generator().manual_seed(config.seed + 1)
        torch.manual_seed(config.seed + self.accelerator.process_index)
        self._prompt_order: list[int] = []
        self.global_step = 0
        self.output_dir = Path(config.output_dir)

    # ------------------------------------------------------------------ setup checks
    @staticmethod
    def _tokenizer_for(model) -> PreTrainedTokenizerBase:
        base = base_model_of(model)
        name = getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "")
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as exc:
            raise ValueError(
                f"No tokenizer was given and none could be loaded for the model ({name!r}): pass tokenizer=... "
                "(the tokenizer the model was trained with)."
            ) from exc

    def _validate_prompts(self, train_dataset, model) -> list[str]:
        if hasattr(train_dataset, "column_names"):
            prompts = prompts_from_dataset(train_dataset)
        elif isinstance(train_dataset, str):
            raise TypeError("train_dataset must be a list of prompts or a datasets.Dataset, not a string; "
                            "load a file with trpo_rlhf.prompts.load_prompts(path).")
        else:
            prompts = [str(p) for p in train_dataset]
        if not prompts:
            raise ValueError("train_dataset is empty: pass at least one prompt (a list of strings or a Dataset with a 'prompt' column).")
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"Prompt {empty[0]} ({prompts[empty[0]]!r}) tokenizes to nothing; remove empty prompts from train_dataset.")
        limit = context_length(base_model_of(model))
        if limit is not None:
            too_long = [i for i, n in enumerate(lengths) if n + self.config.max_new_tokens > limit]
            if too_long:
                i = too_long[0]
                raise ValueError(
                    f"Prompt {i} is {lengths[i]} tokens; with max_new_tokens={self.config.max_new_tokens} that exceeds the "
                    f"model's context of {limit} tokens ({len(too_long)} prompts do). Shorten or drop those prompts, "
                    "or lower --max_new_tokens."
                )
        return prompts

    # ------------------------------------------------------------------ distributed helpers
    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over processes (identity with one process): every process then takes the same step."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

    def average_gradients(self, params) -> None:
        """Replace each gradient by its mean over processes, so every optimizer takes one step."""
        for p in params:
            if p.grad is not None:
                p.grad = self.reduce_mean(p.grad)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _next_prompts(self) -> list[str]:
        world, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, self.config.batch_size
        while len(self._prompt_order) < world * batch:
            self._prompt_order += torch.randperm(len(self.prompts), generator=self.prompt_generator).tolist()
        take, self._prompt_order = self._prompt_order[: world * batch], self._prompt_order[world * batch :]
        return [self.prompts[i] for i in take[rank * batch : (rank + 1) * batch]]

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[str]) -> list[str]:
        """Sample one completion per prompt from the current policy."""
        return self._sample(prompts).completions

    def _sample(self, prompts: list[str]) -> Rollout:
        with self.actor_critic.autocast():
            rollout, _ = sample_completions(
                self.actor_critic.peft_model, self.tokenizer, prompts, self.config.max_new_tokens, self.config.temperature
            )
        return rollout

    def collect_batch(self, timer: PhaseTimer | None = None) -> tuple[Rollout, dict[str, float]]:
        """Sample completions for the next prompts, score them, run the no-grad rollout forwards
        (old and reference log-probs, values) and compute rewards and advantages: everything of a
        step before the updates. `timer` receives the generate/score/rollout_forward phases."""
        cfg = self.config
        timer = timer or PhaseTimer()
        prompts = self._next_prompts()
        with timer("generate"):
            rollout = self._sample(prompts)
        with timer("score"):
            scores = score_batch(self.reward_fn, rollout.prompts, rollout.completions, self.global_step).to(self.device)
        with timer("rollout_forward"):
            rollout = evaluate_rollout(self.actor_critic, rollout, cfg.temperature)
        return self._advantages(dataclasses.replace(rollout, scores=scores))

    def step(self) -> dict[str, float]:
        """One iteration on the next prompt batch; returns (and logs) its metrics."""
        cfg = self.config
        timer = PhaseTimer()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with timer("step"):
            batch, shaping_stats = self.collect_batch(timer)
            with timer("policy_update"):
                policy_stats = self.policy_update(batch)
            with timer("value_update"):
                value_stats = self.value_update(batch)
            self.kl_ctl.update(shaping_stats["kl/ref"], cfg.batch_size * self.accelerator.num_processes)

        all_scores = self.accelerator.gather(batch.scores)
        stats = {
            "step": self.global_step + 1,
            "reward/mean": all_scores.mean().item(),
            "reward/std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            **shaping_stats,
            **policy_stats,
            **value_stats,
            "policy/entropy": self.reduce_mean(masked_mean(batch.entropy, batch.response_mask)).item(),
            "response/length_mean": self.reduce_mean(batch.response_mask.sum(1).mean()).item(),
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            "memory/peak_mb": peak_memory_mb(self.device),
        }
        self.global_step += 1
        self._log(stats)
        return stats

    def train(self) -> list[dict[str, float]]:
        """Run `config.max_steps` iterations with a progress bar, then save to `output_dir`.

        If anything fails (a reward error, Ctrl-C), the last completed state is saved to
        `output_dir/checkpoint-<step>` before the exception propagates; metrics.jsonl has every
        finished step.
        """
        history = []
        bar = tqdm(total=self.config.max_steps, initial=self.global_step, desc=self.progress_name,
                   disable=not self.is_main_process, dynamic_ncols=True)
        try:
            while self.global_step < self.config.max_steps:
                stats = self.step()
                history.append(stats)
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl_ref=f"{stats['kl/ref']:.3f}", **self._progress_fields(stats))
                if self.config.save_steps and self.global_step % self.config.save_steps == 0:
                    self.save_pretrained(self.output_dir / f"checkpoint-{self.global_step}")
        except BaseException:
            # No barrier here: the other processes may be blocked in a collective of the failed step.
            if self.global_step > 0 and self.is_main_process:
                path = self.output_dir / f"checkpoint-{self.global_step}"
                self._write_checkpoint(path)
                print(f"Training stopped after step {self.global_step}; its state is saved in {path}.")
            raise
        finally:
            bar.close()
        self.save_pretrained(self.output_dir)
        return history

    def save_pretrained(self, path: str | Path) -> None:
        """The policy adapter (loadable with `PeftModel.from_pretrained(base, path)`), the critic
        (`path/value`, see `load_value_function`), the tokenizer and the config."""
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            self._write_checkpoint(Path(path))
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, path: Path) -> None:
        self.actor_critic.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.config.save(path / "trainer_config.json")

    def load_value_function(self, path: str | Path) -> None:
        """Restore the critic saved by `save_pretrained(path)`."""
        self.actor_critic.load_value_function(path)

    # ------------------------------------------------------------------ shared pieces
    def _advantages(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        cfg = self.config
        mask = rollout.response_mask
        kl_coef = self.kl_ctl.value
        rewards = token_rewards(rollout.scores, rollout.logp_old, rollout.logp_ref, mask, kl_coef)
        advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        kl_ref = self.reduce_mean(sequence_kl(rollout.logp_old, rollout.logp_ref, mask).mean()).item()
        stats = {
            "kl/ref": kl_ref,
            "kl/coef": kl_coef,
            "value/explained_variance": explained_variance(rollout.values, returns, mask),
        }
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
                    values = self.actor_critic.values(**mini.model_inputs()).float()
                    loss = value_loss(values, mini.values, mini.returns, mini.response_mask, cfg.value_clip_range)
                    self.value_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.average_gradients(params)
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
        """L = mean over valid tokens of exp(logp_theta - logp_old) * A_t (DESIGN §2), `logp` the
        log-probs of the taken tokens."""
        return masked_mean(torch.exp(logp - batch.logp_old) * batch.advantages, batch.response_mask)

    @torch.no_grad()
    def measure_policy_change(self, batch: Rollout, logp_all_old: torch.Tensor) -> tuple[float, float]:
        """(L(theta) - L(theta_old), mean over valid tokens of the exact KL(pi_old || pi_theta) over
        the vocabulary) on `batch`, from one forward at the current parameters, averaged across
        processes. TRPO's line search (`trpo/kl`, `trpo/surrogate_gain`) and PPO's `ppo/kl` and
        `ppo/surrogate_gain` all come from here, so the two updates are measured alike."""
        logp_all = self.policy_log_probs(batch)
        actions = batch.response_ids
        gain = self.surrogate(batch, gather_tokens(logp_all, actions)) - self.surrogate(batch, gather_tokens(logp_all_old, actions))
        kl = masked_mean(categorical_kl(logp_all_old, logp_all, chunk_size=KL_CHUNK_POSITIONS), batch.response_mask)
        return self.reduce_mean(gain).item(), self.reduce_mean(kl).item()

    def _progress_fields(self, stats: dict[str, float]) -> dict[str, str]:
        return {}

    def _log(self, stats: dict[str, float]) -> None:
        if not self.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Step 1 starts the file: a new run in an old output_dir must not append to its metrics.
        with open(self.output_dir / METRICS_FILE, "w" if stats["step"] == 1 else "a") as f:
            f.write(json.dumps(stats) + "\n")


class TRPOTrainer(RLTrainer):
    """TRPO over the policy LoRA tensors (Schulman et al. 2015), see `policy_update`.

        >>> trainer = TRPOTrainer(config=TRPOConfig(max_steps=50), model="embedded",
        ...                       reward_fn="vader", train_dataset=default_prompts())    # doctest: +SKIP
        >>> stats = trainer.step()                                                        # doctest: +SKIP
        >>> stats["trpo/kl"] <= config.kl_tolerance * config.max_kl                     # doctest: +SKIP
        True
    """

    progress_name = "TRPO"

    def __init__(self, config: TRPOConfig, *args, **kwargs):
        if not isinstance(config, TRPOConfig):
            raise TypeError(f"TRPOTrainer needs a TRPOConfig, got {type(config).__name__}.")
        super().__init__(config, *args, **kwargs)

    def _fisher_batch(self, batch: Rollout) -> Rollout:
        n = max(1, round(self.config.fvp_subsample * len(batch)))
        if n == len(batch):
            return batch
        return batch.select(torch.randperm(len(batch), generator=self.minibatch_generator)[:n])

    def _fisher_logits(self, batch: Rollout) -> torch.Tensor:
        """The policy's logits with a graph, attention on the double-backward-capable path (both
        Fisher forms differentiate a gradient; the fused kernels cannot)."""
        with double_backward_attention(self.actor_critic.peft_model):
            return self.policy_logits(batch)

    def _fisher_vector_product(self, logits: torch.Tensor, mask: torch.Tensor, params: list[torch.nn.Parameter],
                               jacobian: LinearizedLogits | None = None) -> DampedFisherProduct:
        """v -> (F + cI) v, F the Fisher of the mean per-token KL at theta_old over the sequences
        whose `logits` (from `_fisher_logits`) are given; its graph is built here, once, and every CG
        iteration reuses it. A `jacobian` already built on these logits is reused."""
        cfg: TRPOConfig = self.config
        if cfg.fvp_method == "gauss_newton":
            jacobian = jacobian or LinearizedLogits(logits, params)
            return gauss_newton_fvp(jacobian, mask / mask.sum().clamp(min=1), cfg.cg_damping, reduce=self.reduce_mean)
        logp = torch.log_softmax(logits, dim=-1)
        # KL(stop_grad(pi) || pi): zero value and gradient at theta_old, Hessian = Fisher.
        mean_kl = masked_mean(categorical_kl(logp.detach(), logp), mask)
        return fisher_vector_product(mean_kl, params, cfg.cg_damping, reduce=self.reduce_mean)

    def policy_update(self, batch: Rollout) -> dict[str, float]:
        """One TRPO step (DESIGN §2):

        1. g = grad L(theta_old), L = mean_t exp(logp_theta - logp_old) * A_t;
        2. x ~ (F + cI)^-1 g by CG, F v = J^T M J v (or by double backprop) over one graph built
           once: the very forward g came from when the Fisher uses the whole batch;
        3. full step s = sqrt(2 delta / x^T F x) x, so that 1/2 s^T F s = delta;
        4. backtracking on the measured exact KL and the surrogate; exact restore on failure.
        """
        cfg: TRPOConfig = self.config
        actor_critic = self.actor_critic
        params = actor_critic.policy_parameters()
        timer = PhaseTimer()

        fisher_batch = self._fisher_batch(batch)
        # With the Fisher on the whole batch, one forward serves g and F: g = J^T dL/dlogits is a
        # backward over the very graph the products reuse, and the Gauss-Newton form builds its
        # graph at u = dL/dlogits, so g is the value of that build (a forward and a backward fewer).
        shared_forward = fisher_batch is batch
        jacobian = None
        with timer("gradient"):
            logits = self._fisher_logits(batch) if shared_forward else self.policy_logits(batch)
            surrogate = self.surrogate(batch, token_logprobs(logits, batch.response_ids))
            surrogate_old = self.reduce_mean(surrogate.detach()).item()
            if shared_forward and cfg.fvp_method == "gauss_newton":
                (surrogate_logits_grad,) = torch.autograd.grad(surrogate, logits)
                jacobian = LinearizedLogits(logits, params, at=surrogate_logits_grad)
                grad = jacobian.vjp_at
                del surrogate_logits_grad
            else:
                grad = flat_grad(surrogate, params, retain_graph=shared_forward)
            grad = self.reduce_mean(grad)
            del surrogate

        with timer("fvp_graph"):
            fisher_logits = logits if shared_forward else self._fisher_logits(fisher_batch)
            fvp = self._fisher_vector_product(fisher_logits, fisher_batch.response_mask, params, jacobian)
            del fisher_logits, jacobian
            # pi_old over the vocabulary, for the line-search KL: the gradient's own logits, turned
            # into log-probs in place once the Fisher has taken its probabilities from them (no
            # second forward, no copy; nothing left in any graph reads these values).
            logp_all_old = log_softmax_(logits.detach())
            del logits

        with timer("cg"):
            # The tolerance is relative: LoRA gradients can be far smaller than any absolute one.
            grad_sq = torch.dot(grad, grad).item()
            cg = cg_solve(fvp, grad, cfg.cg_iters, cfg.cg_residual_tol * grad_sq)
            # x^T (F + cI) x = x^T (g - r): CG's own residual saves the product an explicit
            # x^T F x would cost (one FVP of the eleven at cg_iters=10).
            x_fx = cg.x_ax
        fvp_calls = fvp.calls
        del fvp  # free the Fisher graph before the line search

        stats = {
            "trpo/grad_norm": grad.norm().item(),
            "trpo/cg_residual": cg.residual / grad_sq if grad_sq > 0 else 0.0,
            "trpo/cg_iters": float(cg.iterations),
            "trpo/fvp_count": float(fvp_calls),
            "trpo/surrogate_old": surrogate_old,
        }
        if not (math.isfinite(x_fx) and x_fx > 0):
            # g = 0 (e.g. all advantages equal) or a numerically broken solve: no direction to take.
            return stats | self._rejected_stats(timer, expected_gain=0.0, line_search_iters=0)

        full_step = math.sqrt(2 * cfg.max_kl / x_fx) * cg.x
        expected_gain = torch.dot(grad, full_step).item()

        with timer("line_search"):
            result = backtracking_line_search(
                params,
                full_step,
                expected_gain,
                lambda: self.measure_policy_change(batch, logp_all_old),
                max_kl=cfg.max_kl,
                kl_tolerance=cfg.kl_tolerance,
                backtrack_coef=cfg.backtrack_coef,
                max_backtracks=cfg.line_search_steps,
                accept_ratio=cfg.accept_ratio,
            )
        if not result.accepted:
            return stats | self._rejected_stats(timer, expected_gain, result.iterations)
        return stats | {
            "trpo/accepted": 1.0,
            "trpo/kl": result.kl,
            # With a correct Fisher, measured KL ~ delta * frac^2 for small delta (DESIGN §2).
            "trpo/kl_predicted": cfg.max_kl * result.step_frac**2,
            "trpo/step_frac": result.step_frac,
            "trpo/surrogate_gain": result.surrogate_gain,
            "trpo/expected_gain": expected_gain * result.step_frac,
            "trpo/line_search_iters": float(result.iterations),
            "trpo/step_norm": (full_step.norm() * result.step_frac).item(),
            **{f"time/policy_{k}": v for k, v in timer.seconds.items()},
        }

    def _rejected_stats(self, timer: PhaseTimer, expected_gain: float, line_search_iters: int) -> dict[str, float]:
        return {
            "trpo/accepted": 0.0,
            "trpo/kl": 0.0,
            "trpo/kl_predicted": 0.0,
            "trpo/step_frac": 0.0,
            "trpo/surrogate_gain": 0.0,
            "trpo/expected_gain": expected_gain,
            "trpo/line_search_iters": float(line_search_iters),
            "trpo/step_norm": 0.0,
            **{f"time/policy_{k}": v for k, v in timer.seconds.items()},
        }

    def _progress_fields(self, stats: dict[str, float]) -> dict[str, str]:
        return {"trpo_kl": f"{stats['trpo/kl']:.4f}", "acc": f"{int(stats['trpo/accepted'])}"}
