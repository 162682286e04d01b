"""Rollouts: sample completions, and evaluate them under the policy, the reference and the critic.

A `Rollout` holds one batch of left-padded prompts followed by right-padded responses:

    input_ids  = [pad pad p1 p2 p3 | r1 r2 EOS pad]      (prompt length P, response length T)
    response_mask          =       [ 1  1  1   0 ]      (valid up to and including the first EOS)

and, per response position t, logp_old (the sampling policy), logp_ref (adapters off), values
and the entropy of the sampling distribution. Sampling uses softmax(logits / temperature) with
no other processing, so these log-probs are exactly those of the distribution sampled from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedTokenizerBase, StaticCache

from .actor_critic import LoraActorCritic, base_model_of


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows that count real tokens only, as generate() numbers them."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@dataclass
class Rollout:
    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    response_mask: torch.Tensor  # [B, T], float
    logp_old: torch.Tensor | None = None  # [B, T]
    logp_ref: torch.Tensor | None = None  # [B, T]
    values: torch.Tensor | None = None  # [B, T]
    entropy: torch.Tensor | None = None  # [B, T]
    scores: torch.Tensor | None = None  # [B]
    advantages: torch.Tensor | None = None  # [B, T]
    returns: torch.Tensor | None = None  # [B, T]
    # The critic's cached input: the reference's hidden states entering the critic's first layer
    # [B, P+T, H] (critic_layers).
    features: torch.Tensor | None = None

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, -self.response_length :]

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)

    def model_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "response_length": self.response_length,
        }

    def select(self, index: torch.Tensor | list[int]) -> Rollout:
        """The sub-batch of the given sequence indices."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value
        return Rollout(**picked)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def sampling_generation_config(
    tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, temperature: float, output_scores: bool = False
) -> GenerationConfig:
    """Pure ancestral sampling from softmax(logits / temperature).

    Every knob that would reshape the distribution is set to its neutral value explicitly:
    transformers fills unset fields from the checkpoint's generation_config and then from global
    defaults, which include top_k=50.
    """
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=output_scores,
    )


def compiled_decode_config(device: torch.device) -> CompileConfig:
    """How generate() compiles the decode step of a static KV cache: transformers' default on
    CUDA (mode reduce-overhead: CUDA graphs, which pay where one token's kernels are launch-bound),
    plain inductor kernels elsewhere, where transformers would not compile at all."""
    if device.type == "cuda":
        return CompileConfig()
    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling off CUDA
    return config


def static_decode_cache(model: torch.nn.Module, length: int) -> StaticCache:
    """A KV cache of `length` positions whose shapes never change, so the compiled decode step is
    traced once: a cache sized to each batch's prompts would retrace whenever a longer one came."""
    return StaticCache(config=base_model_of(model).config, max_cache_len=length)


@contextlib.contextmanager
def _checkpoint_generation_defaults_removed(model: torch.nn.Module) -> Iterator[None]:
    # Fields a checkpoint may set whose "off" value is None (suppress_tokens, bad_words_ids,
    # min_p, ...) cannot be overridden by passing None; hide the checkpoint's config instead.
    base = base_model_of(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(response_ids, dtype=torch.float32)
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).float()


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    return_scores: bool = False,
    static_cache_length: int | None = None,
    add_special_tokens: bool = True,
) -> tuple[Rollout, torch.Tensor | None]:
    """Generate one completion per prompt (batched, left-padded, KV cache, each row stops at EOS).

    Returns a Rollout with ids, masks and decoded completions (no log-probs yet) and, when
    `return_scores`, the processed logits generate() sampled from: [B, T, V].

    `static_cache_length` (None: a dynamic cache, eager) decodes with a static KV cache of at least
    that many positions and a compiled decode step (`compiled_decode_config`); pass the longest
    prompt plus `max_new_tokens` so every batch runs the same compiled graph. `add_special_tokens`
    False tokenizes chat-templated prompts as `apply_chat_template` does (the template holds them).
    """
    device = next(model.parameters()).device
    enc = tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens
    ).to(device)
    generation_config = sampling_generation_config(tokenizer, max_new_tokens, temperature, output_scores=return_scores)
    static_cache = {}
    if static_cache_length is not None:
        generation_config.compile_config = compiled_decode_config(device)
        length = max(static_cache_length, enc["input_ids"].shape[1] + max_new_tokens)
        static_cache["past_key_values"] = static_decode_cache(model, length)
    with _checkpoint_generation_defaults_removed(model):
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            generation_config=generation_config,
            **static_cache,
        )
    prompt_length = enc["input_ids"].shape[1]
    response_ids = out.sequences[:, prompt_length:]
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id).to(device)
    text_ids = [row[: int(m.sum())].tolist() for row, m in zip(response_ids, response_mask)]
    completions = tokenizer.batch_decode(text_ids, skip_special_tokens=True)
    rollout = Rollout(
        prompts=list(prompts),
        completions=completions,
        input_ids=out.sequences,
        attention_mask=torch.cat([enc["attention_mask"], response_mask.long()], dim=1),
        response_mask=response_mask,
    )
    scores = torch.stack(out.scores, dim=1) if return_scores else None
    return rollout, scores


def gather_tokens(logp_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-prob of each taken token from log-probs over the vocabulary: [B, T, V], [B, T] -> [B, T]."""
    return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] = logits[token] - logsumexp(logits) per position: [B, T, V], [B, T] -> [B, T].
    No [B, T, V] log-softmax is materialised (nor kept for the backward)."""
    return gather_tokens(logits, tokens) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@torch.no_grad()
def evaluate_rollout(
    actor_critic: LoraActorCritic,
    rollout: Rollout,
    temperature: float,
    sampling_logits: torch.Tensor | None = None,
) -> Rollout:
    """Fill in logp_old, logp_ref, values (with a critic) and entropy (and, with `critic_layers`, the
    features the values were read from) for a sampled rollout (no gradients).

    `sampling_logits`, the logits / temperature generation sampled from (`sample_completions(...,
    return_scores=True)`, [B, T, V]), stand in for the policy's forward: they are the same
    distribution, computed through the KV cache, as TRL takes its old log-probs.

        rollout, sampling_logits = sample_completions(model, tokenizer, prompts, 24, 1.0, return_scores=True)
        rollout = evaluate_rollout(actor_critic, rollout, 1.0, sampling_logits)
    """
    inputs = rollout.model_inputs()
    actions = rollout.response_ids
    features = None
    if sampling_logits is not None:
        policy_logits = sampling_logits.float()
    else:
        policy_logits = actor_critic.policy_logits(**inputs, temperature=temperature)
    logp_old = token_logprobs(policy_logits, actions)
    entropy = entropy_from_logits(policy_logits)
    del policy_logits
    if actor_critic.critic_reads_reference:  # the critic's top layers start where the reference's lower ones end
        reference_logits, features = actor_critic.reference_logits_and_critic_inputs(**inputs, temperature=temperature)
    else:
        reference_logits = actor_critic.reference_logits(**inputs, temperature=temperature)
    logp_ref = token_logprobs(reference_logits, actions)
    mask = rollout.response_mask
    del reference_logits
    values = actor_critic.values(**inputs, features=features).float() * mask if actor_critic.has_critic else None
    return dataclasses.replace(
        rollout,
        logp_old=logp_old * mask,
        logp_ref=logp_ref * mask,
        values=values,
        entropy=entropy * mask,
        features=features,
    )


@torch.no_grad()
def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in place (no graph): logits - logsumexp(logits)."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
