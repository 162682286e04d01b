"""TRL's PPO as the external reference: any text reward in the interface TRL's PPOTrainer calls,
and the PPOTrainer built from our PPOConfig.

TRL's PPO (trl 1.12, `trl.experimental.ppo`) scores a rollout with
`trl.experimental.utils.get_reward(model, query_responses, pad_token_id, context_length)`, which
calls ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., ...)`` on the
*policy's* token ids, passes ``hidden_states[-1]`` through ``model.score`` and reads the result at
the last response token. A text reward (a callable, VADER, or a classifier with its own
tokenizer) needs those ids decoded first; `TextRewardModel` does that and answers in that shape.

get_reward does not pass the prompt/response boundary to the model, so the prompts must all be
left-padded to one `prompt_length` (the TRL recipe builds its dataset that way); the response is
what follows.

    >>> from trpo_rlhf.experiments.trl_adapter import TextRewardModel
    >>> reward_model = TextRewardModel(reward_fn, tokenizer, prompt_length=16)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from ..actor_critic import lora_config_from
from ..metrics import append_jsonl
from ..rewards import RewardFn, check_finite_scores, score_batch


def trl_available() -> bool:
    """Whether TRL's PPO (the trl-ppo extra, trl==1.12.0) can be imported."""
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError:
        return False
    return True


class _TextScorer(nn.Module):
    """Decodes prompt and response from the policy's ids and scores them with the text reward."""

    def __init__(self, reward_fn: RewardFn, tokenizer: PreTrainedTokenizerBase, prompt_length: int):
        super().__init__()
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.calls = 0

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[str], list[str]]:
        """Prompt and response texts of each row: the unmasked tokens before and after prompt_length."""
        P = self.prompt_length
        prompts, responses = [], []
        for ids, mask in zip(input_ids, attention_mask.bool()):
            prompts.append(self.tokenizer.decode(ids[:P][mask[:P]].tolist(), skip_special_tokens=True))
            responses.append(self.tokenizer.decode(ids[P:][mask[P:]].tolist(), skip_special_tokens=True))
        return prompts, responses

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused) -> SimpleNamespace:
        if input_ids.shape[1] < self.prompt_length:
            raise ValueError(
                f"Got {input_ids.shape[1]} tokens but prompt_length={self.prompt_length}: the queries must be "
                "left-padded to prompt_length (see recipes/trl_ppo_gpt2_sentiment.py)."
            )
        prompts, responses = self.decode(input_ids, attention_mask)
        scores = score_batch(self.reward_fn, prompts, responses, self.calls)
        check_finite_scores(scores, prompts, responses, self.calls)  # TRL's PPO has no guard of its own
        scores = scores.to(input_ids.device)
        self.calls += 1
        # The same score at every position: get_reward reads the one at the last response token.
        per_position = scores[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(per_position,))


class TextRewardModel(nn.Module):
    """A reward "model" for TRL's PPOTrainer that returns ``reward_fn(prompts, responses)`` of the
    decoded texts. `prompt_length` is the length every query is left-padded to."""

    base_model_prefix = "text_scorer"

    def __init__(self, reward_fn: RewardFn, tokenizer: PreTrainedTokenizerBase, prompt_length: int):
        super().__init__()
        self.text_scorer = _TextScorer(reward_fn, tokenizer, prompt_length)

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def left_pad(token_ids: list[list[int]], pad_token_id: int, length: int | None = None) -> list[list[int]]:
    """Left-pad every sequence to `length` (default: the longest), the layout `TextRewardModel`
    needs its queries in."""
    length = length or max(len(ids) for ids in token_ids)
    too_long = [len(ids) for ids in token_ids if len(ids) > length]
    if too_long:
        raise ValueError(f"A prompt has {too_long[0]} tokens, more than the padded length {length}.")
    return [[pad_token_id] * (length - len(ids)) + list(ids) for ids in token_ids]


# TRL's metric -> our key. ppo/kl is TRL's approximate KL of the update on the sampled tokens.
TRL_TO_OURS = {
    "objective/scores": "reward/mean",
    "objective/kl": "kl/ref",
    "policy/approxkl_avg": "ppo/kl",
    "policy/clipfrac_avg": "ppo/clipfrac",
    "loss/value_avg": "value/loss",
    "policy/entropy_avg": "policy/entropy",
    "loss/policy_avg": "ppo/policy_loss",
}


class MetricsJsonl(TrainerCallback):
    """Append one line per TRL update to metrics.jsonl: TRL's metrics under our key names
    (`key_map`; a log without its first key is not an update's), the `extra(logs)` metrics, and
    those of each `metric_hooks` function of the trainer's policy (a PEFT model) after the update."""

    def __init__(self, path: Path, device: torch.device, policy=None, metric_hooks=(), key_map=None, extra=None):
        self.path, self.device, self.policy, self.metric_hooks = Path(path), device, policy, list(metric_hooks)
        self.key_map, self.extra = key_map or TRL_TO_OURS, extra
        self.step, self.last = 0, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        from ..profiling import peak_memory_mb

        if not logs or next(iter(self.key_map)) not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        self.step += 1
        row = {
            "step": self.step,
            **{ours: logs[trl] for trl, ours in self.key_map.items() if trl in logs},
            **(self.extra(logs) if self.extra else {}),
            "time/step": now - self.last,
            "memory/peak_mb": peak_memory_mb(self.device),
        }
        for hook in self.metric_hooks:
            row.update(hook(self.policy))
        self.last = now
        append_jsonl(self.path, row)


def load_policy_and_value_model(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy, a value model (the same base with a scalar head, as TRL expects) and the
    tokenizer (with a pad token) from a hub id, a local path or "embedded"."""
    from transformers import AutoModelForSequenceClassification

    from ..loading import EMBEDDED, embedded_model_path, ensure_pad_token, load_causal_lm

    policy, tokenizer = load_causal_lm(name_or_path)
    ensure_pad_token(tokenizer, policy)
    path = embedded_model_path() if name_or_path == EMBEDDED else name_or_path
    value_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    return policy, value_model, tokenizer


def build_trl_ppo_trainer(
    config,
    policy: PreTrainedModel,
    value_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    reward_fn: RewardFn,
    lr_scheduler_type: str = "constant",
    metric_hooks=(),
):
    """`trl.experimental.ppo.PPOTrainer` (trl==1.12.0) with the settings of our `PPOConfig`:
    the same batch, response length, temperature, epochs, minibatches, learning rate, clip ranges,
    KL coefficient, GAE and LoRA adapter. TRL keeps its own design where it has one (a full value
    model trained jointly with vf_coef). Writes metrics.jsonl in config.output_dir, each row with the
    metrics of `metric_hooks` (functions of the PEFT policy, e.g. `ExactEvaluator.of_peft_model`).

    The learning rate is constant, as in our PPO, unless `lr_scheduler_type` says otherwise. TRL's
    own default, "linear", decays it to zero over the run, which on short runs is a different
    algorithm (README, "TRPO vs PPO", TRL's learning rate)."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer as TRLPPOTrainer

    value_model.config.pad_token_id = tokenizer.pad_token_id
    # TRL's dataloader drops the last partial batch and loops over it forever: with fewer prompts
    # than a batch it would spin without ever yielding. Repeat them, as our trainers cycle theirs.
    prompts = list(prompts) * -(-config.batch_size // len(prompts))
    prompt_ids = tokenizer(prompts)["input_ids"]
    prompt_length = max(len(ids) for ids in prompt_ids)
    dataset = Dataset.from_dict({"input_ids": left_pad(prompt_ids, tokenizer.pad_token_id, prompt_length)})
    trl_config = TRLPPOConfig(
        output_dir=config.output_dir,
        seed=config.seed,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=config.batch_size,
        total_episodes=config.max_steps * config.batch_size,
        response_length=config.max_new_tokens,
        temperature=config.temperature,
        stop_token="eos",
        num_ppo_epochs=config.ppo_epochs,
        num_mini_batches=config.num_minibatches,
        learning_rate=config.learning_rate,
        lr_scheduler_type=lr_scheduler_type,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        cliprange=config.clip_range,
        cliprange_value=config.value_clip_range if config.value_clip_range is not None else 1e9,
        kl_coef=config.init_kl_coef,
        gamma=config.gamma,
        lam=config.gae_lambda,
        num_sample_generations=0,
        gradient_checkpointing=False,
        bf16=config.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    trainer = TRLPPOTrainer(
        args=trl_config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # with a PEFT policy TRL uses the base with the adapter disabled, as we do
        reward_model=TextRewardModel(reward_fn, tokenizer, prompt_length),
        train_dataset=dataset,
        value_model=value_model,
        peft_config=lora_config_from(config),
    )
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    metrics = MetricsJsonl(
        Path(config.output_dir) / "metrics.jsonl", trainer.accelerator.device, trainer.model.policy, metric_hooks
    )
    trainer.add_callback(metrics)
    return trainer


def value_model_like(policy: PreTrainedModel) -> PreTrainedModel:
    """A scalar-head sequence classifier with `policy`'s backbone weights (copied): the separate
    value model TRL's PPO expects, for a policy that exists only as a model object."""
    from transformers import AutoModelForSequenceClassification

    config = policy.config.__class__.from_dict({**policy.config.to_dict(), "num_labels": 1})
    value_model = AutoModelForSequenceClassification.from_config(config, dtype=policy.dtype).to(policy.device)
    backbone = getattr(value_model, value_model.base_model_prefix)
    backbone.load_state_dict(getattr(policy, policy.base_model_prefix).state_dict())
    return value_model.eval()


def build_trl_ppo_for_task(task, config, lr_scheduler_type: str = "constant", metric_hooks=()):
    """TRL's PPOTrainer on a `trpo_rlhf.experiments.Task` with our `PPOConfig`: the task's policy,
    a value model of the same backbone with a scalar head (TRL trains a separate one), its
    prompts and its reward. The comparison and the benchmark build TRL's runs here.

        >>> build_trl_ppo_for_task(build_task("toy"), PPOConfig(output_dir="runs/trl")).train()  # doctest: +SKIP
    """
    from ..rewards import build_reward_fn

    if isinstance(task.model, str):
        policy, value_model, tokenizer = load_policy_and_value_model(task.model)
    else:
        policy, value_model, tokenizer = task.model, value_model_like(task.model), task.tokenizer
    return build_trl_ppo_trainer(
        config,
        policy,
        value_model,
        tokenizer,
        task.prompts,
        build_reward_fn(task.reward_model),
        lr_scheduler_type,
        metric_hooks,
    )


# ---------------------------------------------------------------------------------------------- GRPO
# TRL's GRPO metric -> our key (TRL logs its mean per-token KL only when beta > 0; kl/ref is ours).
TRL_GRPO_TO_OURS = {"reward": "reward/mean", "reward_std": "reward/std", "entropy": "policy/entropy"}


def trl_reward_function(reward_fn: RewardFn, name: str):
    """A text reward `reward_fn(prompts, completions)` in the form TRL's GRPOTrainer calls, named
    `name` (TRL logs rewards/<name>)."""

    def reward(prompts, completions, **kwargs):
        scores = score_batch(reward_fn, list(prompts), list(completions), 0)
        check_finite_scores(scores, list(prompts), list(completions), 0)
        return scores.tolist()

    reward.__name__ = name
    return reward


def grpo_metrics(trainer) -> Callable[[dict], dict]:
    """The metrics of a TRL GRPO update beside those TRL names: each reward function's mean as
    `reward/<name>`, and, for a `KLMeasuringGRPOTrainer` (None: no such trainer), `kl/ref`, the
    sampled KL to the reference of the update's completions, per completion."""

    def extra(logs: dict) -> dict:
        each = {
            f"reward/{k.split('/')[1]}": v for k, v in logs.items() if k.startswith("rewards/") and k.endswith("/mean")
        }
        return each if trainer is None else {**each, "kl/ref": trainer.last}

    return extra


@torch.no_grad()
def sampled_kl_to_reference(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> float:
    """The mean over completions of sum_t log pi(a_t) - log pi_ref(a_t) (our `kl/ref`), pi the PEFT
    policy and pi_ref its base with the adapter disabled, at the positions generate() gave them."""
    from ..rollout import position_ids_from_mask, token_logprobs

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = position_ids_from_mask(attention_mask)
    length = completion_ids.shape[1]

    def logp() -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return token_logprobs(out.logits[:, -length - 1 : -1].float(), completion_ids)

    policy = logp()
    with model.disable_adapter():
        reference = logp()
    return float(((policy - reference) * completion_mask).sum(1).mean())


def _kl_measuring_grpo_trainer():
    """TRL's GRPOTrainer, which also measures `kl/ref` on each batch it generates (TRL computes no
    reference log-probs at its default beta 0)."""
    from trl import GRPOTrainer

    class KLMeasuringGRPOTrainer(GRPOTrainer):
        last = math.nan

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            model = self.accelerator.unwrap_model(self.model)
            self.last = sampled_kl_to_reference(
                model, output["prompt_ids"], output["prompt_mask"], output["completion_ids"], output["completion_mask"]
            )
            return output

    return KLMeasuringGRPOTrainer


def build_trl_grpo_trainer(
    config,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    reward_funcs: list,
    columns: dict[str, list] | None = None,
    beta: float = 0.0,
    loss_type: str = "dapo",
    metric_hooks=(),
    measure_kl_ref: bool = True,
):
    """`trl.GRPOTrainer` (trl==1.12.0) with the settings of our `PPOConfig`: the same completions
    per step (`batch_size`) and per prompt (`num_generations`), response length, temperature,
    learning rate (constant), clip range (TRL's epsilon), gradient clipping, `scale_rewards` and
    LoRA adapter, one optimizer step per generated batch (TRL's default: num_iterations 1,
    steps_per_generation 1). `prompts` are strings or chat messages, `columns` the dataset's other
    columns (TRL passes them to the reward functions, as ours); `beta` (TRL's default 0: no
    reference) and `loss_type` (TRL's default "dapo") are TRL's own. Writes metrics.jsonl in
    config.output_dir, with `kl/ref` measured on each generated batch (two forwards more than TRL's
    step at beta 0) unless `measure_kl_ref` is False."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # TRL's sampler draws batch_size / num_generations distinct prompts per step: repeat a short list.
    prompts_per_step = config.batch_size // config.num_generations
    repeats = -(-prompts_per_step // len(prompts))
    dataset = {"prompt": list(prompts) * repeats, **{k: list(v) * repeats for k, v in (columns or {}).items()}}
    trl_config = GRPOConfig(
        output_dir=config.output_dir,
        seed=config.seed,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        epsilon=config.clip_range,
        beta=beta,
        loss_type=loss_type,
        scale_rewards=config.scale_rewards,
        reward_weights=config.reward_weights,
        disable_dropout=True,  # our policy passes run in eval mode: the update sees one deterministic policy
        max_steps=config.max_steps,
        bf16=config.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        log_completions=False,
    )
    trainer_class = _kl_measuring_grpo_trainer() if measure_kl_ref else GRPOTrainer
    trainer = trainer_class(
        model=policy,
        reward_funcs=reward_funcs,
        args=trl_config,
        train_dataset=Dataset.from_dict(dataset),
        processing_class=tokenizer,
        peft_config=lora_config_from(config),
    )
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    metrics = MetricsJsonl(
        Path(config.output_dir) / "metrics.jsonl",
        trainer.accelerator.device,
        trainer.model,
        metric_hooks,
        key_map=TRL_GRPO_TO_OURS,
        extra=grpo_metrics(trainer if measure_kl_ref else None),
    )
    trainer.add_callback(metrics)
    return trainer


def build_trl_grpo_for_task(
    task, config, beta: float = 0.0, loss_type: str = "dapo", metric_hooks=(), measure_kl_ref: bool = True
):
    """TRL's GRPOTrainer on a `trpo_rlhf.experiments.Task` with our `PPOConfig`: the task's policy,
    prompts and dataset columns, and its reward (a text reward as one TRL reward function, or the
    task's TRL-style functions as they are, weighted by `config.reward_weights`).

        >>> build_trl_grpo_for_task(build_task("toy"), PPOConfig(output_dir="runs/grpo", batch_size=8,
        ...                         num_generations=4, advantage_estimator="grpo")).train()  # doctest: +SKIP
    """
    from ..loading import ensure_pad_token, load_causal_lm
    from ..rewards import build_reward_fn

    if isinstance(task.model, str):
        policy, tokenizer = load_causal_lm(task.model)
    else:
        policy, tokenizer = task.model, task.tokenizer
    ensure_pad_token(tokenizer, policy)
    if isinstance(task.reward_model, list):
        reward_funcs = list(task.reward_model)
    else:
        reward_funcs = [trl_reward_function(build_reward_fn(task.reward_model), task.name)]
    return build_trl_grpo_trainer(
        config,
        policy,
        tokenizer,
        task.prompts,
        reward_funcs,
        task.columns,
        beta,
        loss_type,
        metric_hooks,
        measure_kl_ref,
    )
