"""The engine every on-policy trainer here shares: `RLTrainer` runs the rollout, reward shaping,
GAE, the critic, logging, checkpoints and exact resume; a subclass adds only its `policy_update`
(`trpo.TRPOTrainer`, `ppo.PPOTrainer`).

    >>> from trpo_rlhf import TRPOConfig, TRPOTrainer
    >>> config = TRPOConfig(output_dir="runs/x", max_steps=50, batch_size=16, max_new_tokens=24)
    >>> trainer = TRPOTrainer(config=config, model="embedded", reward_fn="vader",
    ...                       train_dataset=["This movie", "I went to see"])        # doctest: +SKIP
    >>> trainer.train()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from .actor_critic import LoraActorCritic, base_model_of
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
from .checkpointing import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_FILE,
    CorruptCheckpointError,
    StopRequest,
    TrainingInterrupted,
    atomic_directory,
    capture_rng_state,
    checkpoint_entries,
    file_manifest,
    list_checkpoints,
    load_checkpoint_file,
    prepare_staging,
    publish_entries,
    read_trainer_state,
    remove_stale_staging,
    restore_rng_state,
    rotate_checkpoints,
    staging_path,
    verify_checkpoint,
)
from .config import RLConfig
from .loading import (
    cast_frozen_base,
    context_length,
    ensure_pad_token,
    fingerprint_differences,
    load_causal_lm,
    model_fingerprint,
    tokenizer_fingerprint,
)
from .metrics import UpdateCosine, append_jsonl
from .profiling import PhaseTimer, peak_memory_mb
from .prompts import check_prompt_strings, prompts_from_dataset
from .rewards import RewardFn, build_reward_fn, score_batch
from .rollout import Rollout, evaluate_rollout, gather_tokens, log_softmax_, sample_completions
from .run_directory import RunDirectory, check_output_dir_path
from .sharding import deepspeed_zero_stage, fsdp_requested, shard_frozen_base
from .tracking import RunTrackers, tracker_names
from .trust_region import KL_CHUNK_POSITIONS, categorical_kl, flat_concat

METRICS_FILE = "metrics.jsonl"
OPTIMIZER_FILE = "optimizer.pt"
FINAL_STAGING = ".final.tmp"
# Settings a resumed run may change without changing what its steps compute.
RESUME_MAY_CHANGE = {
    "output_dir",
    "max_steps",
    "save_steps",
    "save_total_limit",
    "overwrite_output_dir",
    "max_nonfinite_steps",
    "held_out_kl_prompts",  # sampled on a random stream of its own: a measurement, not part of the run
    "gradient_checkpointing",  # recomputes the same activations: memory, not part of the run
    "reward_timeout",
    "ignore_checkpoint_mismatch",
}
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


@dataclasses.dataclass
class TrainingState:
    """Everything the next step depends on, at a step boundary. `tensors` (the trainable tensors)
    is None for a state read from a checkpoint, whose adapters are loaded from their own files."""

    global_step: int
    kl_coef: float
    nonfinite_streak: int
    prompt_order: list[int]
    prompt_generator: torch.Tensor
    minibatch_generator: torch.Tensor
    rng: dict
    optimizers: dict[str, dict]
    tensors: dict[str, torch.Tensor] | None = None


def use_cpu_accelerator() -> bool:
    """Whether this process runs on the CPU: no CUDA device, or more processes on this node than
    GPUs (NCCL needs a GPU of its own per process: the run then uses gloo on the CPU)."""
    if not torch.cuda.is_available():
        return True
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes > torch.cuda.device_count():
        warnings.warn(
            f"{local_processes} processes on this node share {torch.cuda.device_count()} GPU(s); NCCL needs one GPU per "
            f"process, so this run uses the CPU (gloo). Launch at most {torch.cuda.device_count()} processes per node "
            "(accelerate launch --num_processes N) to train on the GPUs.",
            stacklevel=2,
        )
        return True
    return False


class RLTrainer:
    """Shared engine: prompts -> rollout -> scores -> token rewards -> GAE -> policy update
    (subclass) -> critic update -> metrics, with exact resume and atomic checkpoints. Subclasses
    implement `policy_update(batch)`.

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
        self.output_dir = check_output_dir_path(config.output_dir)
        self.run_directory = RunDirectory(self.output_dir)
        self.run_directory.check_ours()  # before anything is written or loaded
        self._check_output_dir_writable()
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
        self.reward_fn = build_reward_fn(reward_fn, device=self.device)
        self.kl_ctl = kl_controller(config.init_kl_coef, config.target_kl_ref, config.kl_horizon)
        self.value_optimizer = torch.optim.Adam(self.actor_critic.value_parameters(), lr=config.value_lr)

        # Prompt order is shared by all processes (same seed); sampling noise differs per process.
        self.prompt_generator = torch.Generator().manual_seed(config.seed)
        self.minibatch_generator = torch.Generator().manual_seed(config.seed + 1)
        torch.manual_seed(config.seed + self.accelerator.process_index)
        self._prompt_order: list[int] = []
        self._batch_prompt_indices: list[int] = []
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

    # ------------------------------------------------------------------ setup checks
    def _check_distributed_type(self) -> None:
        # The trainer averages g, Fisher quadratics and products, line-search measurements and
        # critic gradients itself, and shards the frozen base with FSDP2 (`sharding`) for fsdp.yaml
        # and DeepSpeed ZeRO-3 alike; it never goes through accelerate's prepare.
        kind = self.accelerator.distributed_type
        if kind == DistributedType.MEGATRON_LM:
            raise ValueError(
                f"accelerate's distributed_type is {kind.value}: this trainer does not run under it. Launch with "
                "recipes/accelerate_configs/fsdp.yaml or deepspeed_zero3.yaml (the frozen base sharded) or "
                "multi_gpu.yaml (one replica per GPU)."
            )
        self.sharded = fsdp_requested(kind) or deepspeed_zero_stage(kind) == 3
        if self.sharded and self.config.compile_generation:
            raise ValueError(
                "compile_generation=True with the frozen base sharded (fsdp.yaml, deepspeed_zero3.yaml): the compiled "
                "decode step would gather the sharded layers inside its graph, which this trainer does not support. "
                "Leave --compile_generation off, or launch with multi_gpu.yaml (one replica per GPU)."
            )
        if self.sharded:
            self._check_shardable()

    def _check_shardable(self) -> None:
        """Settings a sharded base cannot run refuse here, before anything is loaded."""

    def _check_output_dir_writable(self) -> None:
        out = self.output_dir
        probe = out / f".write-test-{os.getpid()}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(
                f"output_dir={str(out)!r} is not writable ({exc.strerror or exc}); pass a folder you can write to "
                "with --output_dir."
            ) from exc

    def _check_vocabulary(self, model) -> None:
        embedding = base_model_of(model).get_input_embeddings()
        rows = getattr(embedding, "num_embeddings", None)
        if rows is not None and len(self.tokenizer) > rows:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the model's embedding has {rows} rows, so token ids >= {rows} "
                "would index past it. Pass the tokenizer the model was trained with, or resize the model first: "
                "model.resize_token_embeddings(len(tokenizer))."
            )

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
        if isinstance(train_dataset, Mapping):
            # A dict of columns, as datasets.Dataset.from_dict takes it (iterating it would yield its keys).
            from datasets import Dataset

            try:
                train_dataset = Dataset.from_dict(dict(train_dataset))
            except Exception as exc:
                raise TypeError(
                    f"train_dataset is a {type(train_dataset).__name__} with keys {list(train_dataset)[:4]}: a mapping is "
                    "read as a dataset's columns, e.g. {'prompt': ['This movie', ...]}, each a list of one length "
                    f"({exc})."
                ) from exc
        if hasattr(train_dataset, "column_names"):
            prompts = prompts_from_dataset(train_dataset)
        elif isinstance(train_dataset, str):
            raise TypeError(
                "train_dataset must be a list of prompts or a datasets.Dataset, not a string; "
                "load a file with trpo_rlhf.prompts.load_prompts(path)."
            )
        else:
            prompts = list(train_dataset)
        check_prompt_strings(prompts, "train_dataset")
        if not prompts:
            raise ValueError(
                "train_dataset is empty: pass at least one prompt (a list of strings or a Dataset with a 'prompt' column)."
            )
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        self.longest_prompt_tokens = max(lengths)
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(
                f"Prompt {empty[0]} ({prompts[empty[0]]!r}) tokenizes to nothing; remove empty prompts from train_dataset."
            )
        unknown = self._unknown_only_prompts(prompts)
        if unknown:
            raise ValueError(
                f"Prompt {unknown[0]} ({prompts[unknown[0]]!r}) tokenizes to unknown tokens only "
                f"({self.tokenizer.unk_token!r}; {len(unknown)} prompts do): the model would see nothing of it. Pass the "
                "tokenizer the model was trained with, or remove those prompts."
            )
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

    def _unknown_only_prompts(self, prompts: list[str]) -> list[int]:
        """The prompts whose tokens, special ones aside, are all the unknown token."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        special = set(self.tokenizer.all_special_ids) - {unk}
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [i for i, row in enumerate(ids) if unk in row and all(t == unk or t in special for t in row)]

    def _check_held_out_prompts(self) -> None:
        world, count = self.accelerator.num_processes, self.config.held_out_kl_prompts
        needed = world * (self.config.batch_size + count)
        if count and len(self.prompts) < needed:
            raise ValueError(
                f"held_out_kl_prompts={count} holds out {world * count} prompts beside each step's batch of "
                f"{world * self.config.batch_size}: train_dataset has {len(self.prompts)} prompts, {needed} are needed. "
                "Pass more prompts, or lower --held_out_kl_prompts (0: off)."
            )

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

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any, so all of them take the same branch."""
        if self.accelerator.num_processes == 1:
            return flag
        return self.accelerator.reduce(torch.tensor(float(flag), device=self.device), reduction="sum").item() > 0

    def wait_for_everyone(self) -> None:
        """A barrier across processes. On the CPU it is gloo's plain barrier: accelerate's names a
        device index, which on a machine that has fewer GPUs than processes (the CPU fallback of
        `use_cpu_accelerator`) points at a GPU that does not exist."""
        if self.accelerator.num_processes == 1:
            return
        if self.device.type == "cpu":
            torch.distributed.barrier()
        else:
            self.accelerator.wait_for_everyone()

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _next_prompts(self) -> list[str]:
        world, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, self.config.batch_size
        while len(self._prompt_order) < world * batch:
            self._prompt_order += torch.randperm(len(self.prompts), generator=self.prompt_generator).tolist()
        take, self._prompt_order = self._prompt_order[: world * batch], self._prompt_order[world * batch :]
        self._batch_prompt_indices = take
        return [self.prompts[i] for i in take[rank * batch : (rank + 1) * batch]]

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
            rollout, sampling_logits = self._sample(prompts, return_scores=self.actor_critic.has_value_adapter)
        with timer("score"):
            scores = score_batch(
                self.reward_fn, rollout.prompts, rollout.completions, self.global_step, cfg.reward_timeout
            ).to(self.device)
        with timer("rollout_forward"):
            rollout = evaluate_rollout(self.actor_critic, rollout, cfg.temperature, sampling_logits)
            del sampling_logits
        return self._advantages(dataclasses.replace(rollout, scores=scores))

    def step(self) -> dict[str, float]:
        """One iteration on the next prompt batch; returns (and logs) its metrics.

        If a reward, advantage, gradient, CG solution or step is not finite, the step's updates are
        rejected: the policy and critic are restored bitwise to the previous step's, a warning
        names the quantity, and `max_nonfinite_steps` such steps in a row raise `NonFiniteError`.
        """
        cfg = self.config
        if not self._output_dir_taken:
            # Outside train() (a loop of the caller's own): the first step claims output_dir, unlocked.
            self._take_output_dir(None)
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
                        policy_stats["policy/kl_held_out"] = self.mean_kl(*held_out)
                    held_out = None  # its [B, T, V] log-probs, before the critic's update needs the memory
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

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Run up to `config.max_steps` iterations with a progress bar, then save to `output_dir`.

        `resume_from_checkpoint`: None starts a new run (an `output_dir` holding a previous run is an
        error unless `overwrite_output_dir`, which deletes only the files that run wrote); True
        resumes from the newest intact `output_dir/checkpoint-<step>`; a path resumes from that
        checkpoint. A resumed run continues exactly as if it had never stopped, appending to
        metrics.jsonl. The run holds `output_dir`'s lock throughout: a second run into it fails at once.

        SIGTERM or SIGINT ends the run after the step in progress, saving `checkpoint-<step>` and
        raising `TrainingInterrupted`. Any other failure (a reward error, a second Ctrl-C) saves
        the last completed step's state, rolled back from a half-finished step, before the
        exception propagates. The final state is saved as a checkpoint before the final files
        replace those in `output_dir`, so a run killed during that save is finished by a resume.

            >>> trainer.train(resume_from_checkpoint=True)     # doctest: +SKIP
        """
        with self._output_dir_locked():
            checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
            self._take_output_dir(checkpoint)
            if checkpoint is not None:
                self._load_checkpoint(checkpoint)
            return self._train_steps()

    def _train_steps(self) -> list[dict[str, float]]:
        self._completed_state = self.capture_state()
        history = []
        stop = StopRequest()
        bar = tqdm(
            total=self.config.max_steps,
            initial=self.global_step,
            desc=self.progress_name,
            disable=not self.is_main_process,
            dynamic_ncols=True,
        )
        try:
            with stop.installed():
                while self.global_step < self.config.max_steps:
                    stats = self.step()
                    history.append(stats)
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{stats['reward/mean']:.3f}",
                        kl_ref=f"{stats['kl/ref']:.3f}",
                        **self._progress_fields(stats),
                    )
                    saved = None
                    if self.config.save_steps and self.global_step % self.config.save_steps == 0:
                        saved = self.save_checkpoint()
                    # Checked after the periodic save, so a signal that arrives during it stops the run here.
                    if self.any_process(stop.requested):
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, saved or self.save_checkpoint())
                if self._saved_step != self.global_step:
                    # The final save replaces output_dir's files one by one: with the final state in a
                    # checkpoint first, a run killed during it loses nothing and a resume finishes it.
                    self.save_checkpoint()
                self.save_pretrained(self.output_dir)
        except TrainingInterrupted:
            raise
        except BaseException:
            # No barrier here: the other processes may be blocked in a collective of the failed step.
            if self.global_step > 0 and self.is_main_process:
                try:
                    self._emergency_checkpoint()
                except Exception as save_error:  # the original failure is the one to report
                    print(
                        f"The checkpoint after the failure could not be written either: {save_error!r}", file=sys.stderr
                    )
            raise
        finally:
            bar.close()
            self.trackers.finish()
        return history

    # ------------------------------------------------------------------ state, checkpoints, resume
    def optimizers(self) -> dict[str, torch.optim.Optimizer | UpdateCosine]:
        """The optimizers whose state a checkpoint keeps, by name (and the diagnostics' state)."""
        return {"value": self.value_optimizer, "policy_update_cosine": self.policy_update_cosine}

    def capture_state(self) -> TrainingState:
        """A copy of everything the next step depends on (see `TrainingState`)."""
        return TrainingState(
            global_step=self.global_step,
            kl_coef=self.kl_ctl.value,
            nonfinite_streak=self.nonfinite_streak,
            prompt_order=list(self._prompt_order),
            prompt_generator=self.prompt_generator.get_state(),
            minibatch_generator=self.minibatch_generator.get_state(),
            rng=capture_rng_state(),
            optimizers={name: copy.deepcopy(opt.state_dict()) for name, opt in self.optimizers().items()},
            tensors={name: t.detach().clone() for name, t in self.actor_critic.trainable_tensors().items()},
        )

    def restore_state(self, state: TrainingState, rng: bool = True) -> None:
        """Put the trainer back into `state`, bitwise; `rng=False` restores only the parameters
        and optimizers (a rejected step moves on to the next batch)."""
        if state.tensors is not None:
            with torch.no_grad():
                for name, tensor in self.actor_critic.trainable_tensors().items():
                    tensor.copy_(state.tensors[name])
        for name, optimizer in self.optimizers().items():
            # State whose empty value means "nothing yet" (a `reset` method: the cosine's last change)
            # starts empty when a checkpoint lacks it, saved before the cosine was logged; any other
            # missing state is an error.
            if name not in state.optimizers:
                if not hasattr(optimizer, "reset"):
                    raise ValueError(
                        f"The checkpoint holds no {name!r} state, which these settings need: it was saved with other "
                        f"settings. Resume with those of its trainer_config.json (it holds: {sorted(state.optimizers)})."
                    )
                optimizer.reset()
                continue
            # A deep copy: load_state_dict keeps the given tensors, and Adam updates them in place.
            optimizer.load_state_dict(copy.deepcopy(state.optimizers[name]))
        if not rng:
            return
        self.global_step = state.global_step
        self.kl_ctl.value = state.kl_coef
        self.nonfinite_streak = state.nonfinite_streak
        self._prompt_order = list(state.prompt_order)
        self.prompt_generator.set_state(state.prompt_generator)
        self.minibatch_generator.set_state(state.minibatch_generator)
        restore_rng_state(state.rng)

    # ------------------------------------------------------------------ output_dir: ownership, lock, resume
    @contextlib.contextmanager
    def _output_dir_locked(self) -> Iterator[None]:
        """Hold output_dir's lock (the main process takes it) for the duration."""
        with contextlib.ExitStack() as stack:
            self._on_main_process(lambda: stack.enter_context(self.run_directory.locked()))
            yield

    def _on_main_process(self, action) -> None:
        """Run `action` on the main process; when it fails there, every process raises, so none
        waits in a collective for the others."""
        error = None
        if self.is_main_process:
            try:
                action()
            except (OSError, RuntimeError, ValueError) as exc:  # in use, foreign, used, not writable
                error = exc
        if self.any_process(error is not None):
            raise error or RuntimeError(f"output_dir {self.output_dir}: the main process failed on it (see its error).")

    def resolve_checkpoint(self, resume_from_checkpoint: bool | str | os.PathLike | None) -> Path | None:
        """The checkpoint to resume from (None for a new run), after checking, before any compute and
        without writing anything: output_dir holds nothing foreign; a new run does not mix with a
        previous one; the checkpoint is intact (True: the newest intact one, corrupt ones skipped with
        a warning) and of this output_dir's run."""
        self.run_directory.check_ours()
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            self.run_directory.check_claimable(self.config.overwrite_output_dir)
            return None
        if resume_from_checkpoint is True:
            path = self._newest_intact_checkpoint()
        else:
            path = Path(resume_from_checkpoint)
            missing = [
                name
                for name in (TRAINER_STATE_FILE, OPTIMIZER_FILE, "adapter_model.safetensors")
                if not (path / name).exists()
            ]
            if missing:
                raise FileNotFoundError(
                    f"{path} is not a resumable checkpoint (missing {', '.join(missing)}): pass a checkpoint-<step> folder "
                    "written by train(), or True for the latest one in output_dir."
                )
            verify_checkpoint(path)
        saved = read_trainer_state(path)
        self._check_checkpoint_trainer(path, saved)
        saved_run, this_run = saved.get("run_id"), self.run_directory.run_id()
        if saved_run is not None and saved_run != this_run:
            holds = "holds no run yet" if this_run is None else f"holds run {this_run}"
            self._checkpoint_mismatch(
                f"{path} is a checkpoint of run {saved_run}, and output_dir {self.output_dir} {holds}: resuming would "
                "continue another run's steps among this folder's files."
            )
        return path

    def _newest_intact_checkpoint(self) -> Path:
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True, but {self.output_dir} holds no checkpoint-<step> folder. Start a new run "
                "without it, or pass the path of a checkpoint (runs save them every --save_steps steps and when interrupted)."
            )
        corrupt = []
        for path in reversed(checkpoints):
            try:
                verify_checkpoint(path)
            except CorruptCheckpointError as exc:
                corrupt.append(str(exc))
                continue
            if corrupt:
                warnings.warn(f"Resuming from {path}, the newest intact checkpoint. {' '.join(corrupt)}", stacklevel=3)
            return path
        raise CorruptCheckpointError(checkpoints[-1], "every checkpoint", "is corrupt: " + " ".join(corrupt))

    def _checkpoint_mismatch(self, message: str) -> None:
        if self.config.ignore_checkpoint_mismatch:
            warnings.warn(f"{message} Resuming anyway (ignore_checkpoint_mismatch=True).", stacklevel=3)
            return
        raise ValueError(
            f"{message} Resume from a checkpoint of this run, or pass --ignore_checkpoint_mismatch "
            "(ignore_checkpoint_mismatch=True) to resume it deliberately."
        )

    def _take_output_dir(self, checkpoint: Path | None) -> None:
        """A new run claims output_dir (a previous run's recorded files deleted with
        overwrite_output_dir, and only those); a resume continues the folder's run."""

        def take() -> None:
            if checkpoint is None:
                self.run_id = self.run_directory.claim(self.config.overwrite_output_dir)
            else:
                self.run_id = self.run_directory.adopt()
                remove_stale_staging(self.output_dir)

        self._on_main_process(take)
        self._output_dir_taken = True
        self.wait_for_everyone()

    def _record(self, *names: str, **progress) -> None:
        """Note in output_dir's marker the entries about to be written (main process)."""
        if self.run_id is not None:
            self.run_directory.record(*names, **progress)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-<step>` atomically (all processes call it): the model files
        of `save_pretrained` plus the optimizers, random states, prompt order, KL coefficient and
        step counter, so that `train(resume_from_checkpoint=path)` continues exactly."""
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{self.global_step}"
        state = self.capture_state()
        self.wait_for_everyone()
        if self.is_main_process:
            self._record(*checkpoint_entries(path))
            prepare_staging(path)
        self.wait_for_everyone()
        self._write_rng_state(staging_path(path), state)
        self.wait_for_everyone()
        if self.is_main_process:
            self._write_checkpoint(path, state)
            rotate_checkpoints(self.output_dir, self.config.save_total_limit)
        self.wait_for_everyone()
        self._saved_step = self.global_step
        return path

    def _emergency_checkpoint(self) -> None:
        """After a failure: roll back to the last completed step and save it, unless saved already.
        Only this process's random state is written (the others may be stuck in a collective)."""
        state = self._completed_state
        if state is None or state.global_step == 0:
            return
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if not path.exists():
            self.restore_state(state)
            self._record(*checkpoint_entries(path))
            prepare_staging(path)
            self._write_rng_state(staging_path(path), state)
            self._write_checkpoint(path, state)
        print(
            f"Training stopped after step {state.global_step}; its state is saved in {path} "
            f"(resume with --resume_from_checkpoint {path}).",
            file=sys.stderr,
        )

    def _write_rng_state(self, folder: Path, state: TrainingState) -> None:
        torch.save(
            {
                "rng": state.rng,
                "prompt_generator": state.prompt_generator,
                "minibatch_generator": state.minibatch_generator,
            },
            folder / f"rng_state_{self.accelerator.process_index}.pth",
        )

    def _write_checkpoint(self, path: Path, state: TrainingState) -> None:
        """Everything but the random states (written by each process into the prepared staging
        folder first), then publish: the checkpoint is complete or absent. trainer_state.json records
        the run, the base model's and tokenizer's fingerprints and every other file's size and hash."""
        trainer_state = {
            "trainer": type(self).__name__,
            "global_step": state.global_step,
            "kl_coef": state.kl_coef,
            "nonfinite_streak": state.nonfinite_streak,
            "prompt_order": state.prompt_order,
            "num_processes": self.accelerator.num_processes,
            "run_id": self.run_id,
            **self.fingerprints,
        }
        with atomic_directory(path, prepared=True) as staging:
            self._write_model_files(staging)
            torch.save(state.optimizers, staging / OPTIMIZER_FILE)
            trainer_state["files"] = file_manifest(staging)
            (staging / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state) + "\n")

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore the state saved by `save_checkpoint` (called by `train(resume_from_checkpoint=...)`),
        after checking every file against the sizes and hashes recorded at save."""
        verify_checkpoint(Path(path))
        self._load_checkpoint(Path(path))

    def _check_checkpoint_trainer(self, path: Path, saved: dict) -> None:
        if saved.get("trainer") != type(self).__name__:
            raise ValueError(
                f"{path} was written by {saved.get('trainer')}; resume it with that trainer, not {type(self).__name__}."
            )

    def _load_checkpoint(self, path: Path) -> None:
        saved = read_trainer_state(path)
        self._check_checkpoint_trainer(path, saved)
        for key, what in (("base_model", "base model"), ("tokenizer", "tokenizer")):
            differ = fingerprint_differences(saved[key], self.fingerprints[key]) if key in saved else []
            if differ:
                self._checkpoint_mismatch(
                    f"{path} was saved with another {what} than this trainer's ({', '.join(differ)} differ): its "
                    "adapters and KL reference would not mean what they meant."
                )
        self._warn_on_config_change(path)
        rank = self.accelerator.process_index
        rng_file = path / f"rng_state_{rank}.pth"
        if rng_file.exists():
            random_state = load_checkpoint_file(path, rng_file.name)
        else:
            random_state = {
                "rng": capture_rng_state(),
                "prompt_generator": self.prompt_generator.get_state(),
                "minibatch_generator": self.minibatch_generator.get_state(),
            }
        if not rng_file.exists() or saved["num_processes"] != self.accelerator.num_processes:
            why = (
                "holds no random state for"
                if not rng_file.exists()
                else "was saved by a different number of processes than"
            )
            warnings.warn(
                f"{path} ({saved['num_processes']} process(es)) {why} process {rank} of {self.accelerator.num_processes}: "
                "the resumed run continues, but not bitwise as the original would have.",
                stacklevel=2,
            )
        self.actor_critic.load_policy_adapter(path)
        self.actor_critic.load_value_function(path)
        self.restore_state(
            TrainingState(
                global_step=saved["global_step"],
                kl_coef=saved["kl_coef"],
                nonfinite_streak=saved["nonfinite_streak"],
                prompt_order=saved["prompt_order"],
                prompt_generator=random_state["prompt_generator"],
                minibatch_generator=random_state["minibatch_generator"],
                rng=random_state["rng"],
                optimizers=load_checkpoint_file(path, OPTIMIZER_FILE),
            )
        )
        self._saved_step = self.global_step
        if self.is_main_process:
            self._truncate_metrics(self.global_step)
        self.wait_for_everyone()

    def _warn_on_config_change(self, path: Path) -> None:
        config_file = path / "trainer_config.json"
        if not config_file.exists():
            return
        saved = json.loads(config_file.read_text())
        current = json.loads(json.dumps(self.config.to_dict()))
        changed = [k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k) != current[k]]
        if changed:
            warnings.warn(
                f"Resuming {path} with changed settings {changed}: the run continues with the new values, so it "
                "differs from the one that was interrupted.",
                stacklevel=2,
            )

    def _truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps <= `step` (a killed run may have logged steps after its last
        checkpoint); the resumed run appends from step + 1. A partial last line, what a kill during
        an append leaves, is dropped with a warning."""
        metrics = self.output_dir / METRICS_FILE
        if not metrics.exists():
            return
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError:
                if number < len(lines):
                    raise ValueError(
                        f"{metrics}: line {number} of {len(lines)} is not JSON ({line[:60]!r}); only a last line can be "
                        "cut short by a kill. Repair or remove that line, then resume."
                    ) from None
                warnings.warn(f"{metrics}: dropping its last line, cut short ({line[:60]!r}).", stacklevel=3)
                continue
            if row["step"] <= step:
                kept.append(line)
        staged = metrics.with_name(f".{METRICS_FILE}.tmp")
        self._record(staged.name)
        staged.write_text("".join(line + "\n" for line in kept))
        os.replace(staged, metrics)

    def save_pretrained(self, path: str | Path) -> None:
        """The policy adapter (loadable with `PeftModel.from_pretrained(base, path)`), the critic
        (`path/value`, see `load_value_function`), the tokenizer and the config. The files are
        written into a staging folder and flushed before they replace those in `path`."""
        path = Path(path)
        into_output_dir = path.resolve() == self.output_dir.resolve()
        self.wait_for_everyone()
        if self.is_main_process:
            staging = path / FINAL_STAGING
            if into_output_dir:
                self._record(staging.name)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            self._write_model_files(staging)
            if into_output_dir:
                self._record(*sorted(entry.name for entry in staging.iterdir()))
            publish_entries(staging, path, last="trainer_config.json")
        self.wait_for_everyone()

    def _write_model_files(self, folder: Path) -> None:
        self.actor_critic.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.config.save(folder / "trainer_config.json")

    def load_value_function(self, path: str | Path) -> None:
        """Restore the critic saved by `save_pretrained(path)`."""
        self.actor_critic.load_value_function(path)

    # ------------------------------------------------------------------ shared pieces
    def _advantages(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        cfg = self.config
        mask = rollout.response_mask
        kl_coef = self.kl_ctl.value
        rewards = token_rewards(rollout.scores, rollout.logp_old - rollout.logp_ref, mask, kl_coef)
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
        these passes, so the policy tensors cannot move. With critic="policy_features" the head
        reads the rollout's cached features: the update runs no model pass."""
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
        """(L(theta) - L(theta_old), mean over valid tokens of the exact KL(pi_old || pi_theta) over
        the vocabulary) on `batch`, from one forward at the current parameters, averaged across
        processes. TRPO's line search (`trpo/kl`, `trpo/surrogate_gain`) and PPO's `ppo/kl` and
        `ppo/surrogate_gain` all come from here, so the two updates are measured alike."""
        logp_all = self.policy_log_probs(batch)
        actions = batch.response_ids
        gain = self.surrogate(batch, gather_tokens(logp_all, actions)) - self.surrogate(
            batch, gather_tokens(logp_all_old, actions)
        )
        return self.reduce_mean(gain).item(), self.mean_kl(batch, logp_all_old, logp_all)

    @torch.no_grad()
    def mean_kl(self, batch: Rollout, logp_all_old: torch.Tensor, logp_all: torch.Tensor | None = None) -> float:
        """Mean over `batch`'s valid tokens of the exact KL(pi_old || pi_theta) over the vocabulary,
        averaged across processes; `logp_all` from a forward at the current parameters unless given."""
        kl = masked_mean(self.token_kl(batch, logp_all_old, logp_all), batch.response_mask)
        return self.reduce_mean(kl).item()

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

    def _log(self, stats: dict[str, float]) -> None:
        if not self.is_main_process:
            return
        # TensorBoard logs into output_dir/<run name>, from the trackers' first log on (right after this).
        trackers = [Path(self.trackers.run_name).parts[0]] if self.trackers.enabled else []
        self._record(
            METRICS_FILE, *trackers, global_step=stats["step"]
        )  # fails here if output_dir is no longer writable
        append_jsonl(self.output_dir / METRICS_FILE, stats)
