"""Any text reward in the interface TRL's PPOTrainer calls.

TRL's PPO (trl 1.12, `trl.experimental.ppo`) scores a rollout with
`trl.experimental.utils.get_reward(model, query_responses, pad_token_id, context_length)`, which
calls ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., ...)`` on the
*policy's* token ids, passes ``hidden_states[-1]`` through ``model.score`` and reads the result at
the last response token. A text reward (a callable, VADER, or a classifier with its own
tokenizer) needs those ids decoded first; `TextRewardModel` does that and answers in that shape.

get_reward does not pass the prompt/response boundary to the model, so the prompts must all be
left-padded to one `prompt_length` (the TRL recipe builds its dataset that way); the response is
what follows.

    >>> from trpo_rlhf.trl_adapter import TextRewardModel
    >>> reward_model = TextRewardModel(reward_fn, tokenizer, prompt_length=16)   # doctest: +SKIP
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .rewards import RewardFn, score_batch


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
        scores = score_batch(self.reward_fn, prompts, responses, self.calls).to(input_ids.device)
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
