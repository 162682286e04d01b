"""A toy task that runs in seconds on a CPU: a tiny randomly initialised Llama with a real
word-level tokenizer, and a reward that counts a target word in the completion.

    >>> from trpo_rlhf.experiments.toy import build_word_tokenizer, build_tiny_lm, WordCountReward
    >>> tokenizer = build_word_tokenizer()
    >>> model = build_tiny_lm(tokenizer)
    >>> WordCountReward("good")(["the film was"], ["good good bad"])
    [2.0]

Used by the tests, and by the comparison and benchmark recipes as their `toy` / `tiny` setting.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]
# 64 ordinary words: more than transformers' default top_k of 50, so a test can tell whether
# sampling was truncated.
WORDS = (
    "the a an this that film movie story plot actor actress scene director music ending script "
    "was is were be been felt seemed looked good great bad awful fine dull funny sad long short "
    "and but or so very quite too not really rather I we you they it he she of in on at with "
    "to for from by about as like then again later"
).split()
TOY_PROMPTS = [
    "the film was",
    "this movie is",
    "the story",
    "I felt",
    "the actor was",
    "we thought the plot",
    "the ending",
    "the music was",
    "they said the script",
    "it was",
    "the director",
    "a scene",
]


def build_word_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer (the `tokenizers` library's WordLevel model) with
    [PAD], [UNK] and [EOS] special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words or WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def build_tiny_lm(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 32,
    num_layers: int = 2,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough to train in seconds (about 50k parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def build_tiny_value_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **kwargs
) -> LlamaForSequenceClassification:
    """A scalar-head model on the same backbone weights as `build_tiny_lm(tokenizer, seed=seed)`:
    the separate value model TRL's PPO expects."""
    from .trl_adapter import value_model_like

    return value_model_like(build_tiny_lm(tokenizer, seed=seed, **kwargs))


class WordScoreReward:
    """The sum over the completion's words of a fixed score per word, the vocabulary's scores spread
    evenly over [-1, 1] in an order set by `seed`. Dense: a random policy's completions score all
    alike with negligible probability, so every batch carries signal whatever the device's random
    stream (a single target word can be absent from a whole batch).

        >>> reward = WordScoreReward()
        >>> len(set(reward(["the film"] * 3, ["good", "bad", "dull"])))
        3
    """

    def __init__(self, seed: int = 0):
        order = torch.randperm(len(WORDS), generator=torch.Generator().manual_seed(seed)).tolist()
        self.scores = {WORDS[i]: -1.0 + 2.0 * rank / (len(WORDS) - 1) for rank, i in enumerate(order)}

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [sum(self.scores.get(word, 0.0) for word in c.split()) for c in completions]


class WordCountReward:
    """Number of times `word` occurs in the completion (whitespace-separated)."""

    def __init__(self, word: str = "good"):
        self.word = word

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(c.split().count(self.word)) for c in completions]
