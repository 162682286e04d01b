"""Reward adapters. Every reward is a callable ``(prompts, completions) -> list[float]``.

    >>> from trpo_rlhf.rewards import build_reward_fn
    >>> reward_fn = build_reward_fn("vader")
    >>> [round(s, 2) for s in reward_fn(["The film"], [" was wonderful and moving."])]
    [0.57]

`build_reward_fn` accepts such a callable as is, ``"vader"`` for the offline lexicon scorer, or
the hub id / local path of a `transformers` sequence classifier (scored with its own tokenizer).
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Sequence

import torch

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
VADER = "vader"


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable for one batch."""


class VaderReward:
    """VADER compound sentiment in [-1, 1] (Hutto & Gilbert 2014), offline: the lexicon ships with
    the vaderSentiment package. Scores the completion alone by default, since in a short text the
    prompt's own words would otherwise dominate the score the policy is asked to move."""

    def __init__(self, include_prompt: bool = False):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.include_prompt = include_prompt

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)] if self.include_prompt else completions
        return [self.analyzer.polarity_scores(text)["compound"] for text in texts]


class SequenceClassifierReward:
    """The logit of one label of a `transformers` sequence classifier, on prompt + completion
    decoded to text and re-tokenized with the classifier's own tokenizer (the classic TRL sentiment
    task scores ``query + response`` with lvwerra/distilbert-imdb's POSITIVE logit).

    `label` is a name in the model's label2id (e.g. "POSITIVE") or an index; by default the
    "POSITIVE" label if there is one, else index 1 of a two-label model, else index 0.
    """

    def __init__(
        self,
        name_or_path: str,
        label: str | int | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        include_prompt: bool = True,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
        if device is not None:
            self.model.to(device)
        self.label_index = self._label_index(label)
        self.batch_size = batch_size
        self.include_prompt = include_prompt
        self.max_length = min(getattr(self.tokenizer, "model_max_length", 512) or 512, 512)

    def _label_index(self, label: str | int | None) -> int:
        label2id = {str(k): v for k, v in (self.model.config.label2id or {}).items()}
        num_labels = self.model.config.num_labels
        if label is None:
            if "POSITIVE" in label2id:
                return label2id["POSITIVE"]
            return 1 if num_labels == 2 else 0
        if isinstance(label, int) or str(label).isdigit():
            index = int(label)
            if not 0 <= index < num_labels:
                raise ValueError(
                    f"label={label} is out of range for a classifier with {num_labels} labels; use 0..{num_labels - 1}."
                )
            return index
        if label not in label2id:
            raise ValueError(
                f"label={label!r} is not one of the classifier's labels {sorted(label2id)}; pass one of them or an index."
            )
        return label2id[label]

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)] if self.include_prompt else list(completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            logits = self.model(**enc).logits
            scores.extend(logits[:, self.label_index].float().tolist())
        return scores


def build_reward_fn(reward: RewardFn | str, device: str | torch.device | None = None) -> RewardFn:
    """A callable as given, "vader", or a sequence-classifier hub id / local path (put on `device`)."""
    if callable(reward):
        return reward
    if not isinstance(reward, str) or not reward:
        raise TypeError(
            f"reward_fn={reward!r} is not usable: pass a callable(prompts, completions) -> list[float], "
            "'vader', or the hub id / path of a sequence classifier."
        )
    if reward.lower() == VADER:
        return VaderReward()
    return SequenceClassifierReward(reward, device=device)


FLOAT32_MAX = torch.finfo(torch.float32).max


def call_with_timeout(fn: Callable, timeout: float | None, *args):
    """`fn(*args)`, or `TimeoutError` after `timeout` seconds (None: no limit). The call runs in a
    daemon thread, which keeps the caller's grad mode; a call still hung when the process exits
    does not keep it alive.

        >>> call_with_timeout(sum, 1.0, [1, 2])
        3
    """
    if timeout is None:
        return fn(*args)
    outcome: dict = {}
    grad_enabled = torch.is_grad_enabled()

    def run():
        try:
            with torch.set_grad_enabled(grad_enabled):
                outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def score_batch(
    reward_fn: RewardFn,
    prompts: list[str],
    completions: list[str],
    batch_index: int,
    timeout: float | None = None,
) -> torch.Tensor:
    """Call the reward function (allowed `timeout` seconds) and check its answer: one number per
    completion.

    Raises `RewardError` naming the batch (and the offending entry) otherwise. Non-finite numbers
    pass through: the trainer rejects that step's update and says so (see `RLTrainer.step`).
    """
    try:
        raw = call_with_timeout(reward_fn, timeout, prompts, completions)
    except TimeoutError as exc:
        raise RewardError(
            f"The reward function gave no scores for batch {batch_index} within reward_timeout={timeout:g} s "
            f"(first prompt {prompts[0]!r}): it is hung or too slow. Fix it, or raise --reward_timeout."
        ) from exc
    except Exception as exc:
        raise RewardError(
            f"The reward function raised {type(exc).__name__} on batch {batch_index} "
            f"(first prompt {prompts[0]!r}, first completion {completions[0]!r}): {exc}"
        ) from exc
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):  # a tensor or an array
        raw = raw.tolist()
    # A string or a mapping is iterable too, but its characters or keys are not scores.
    if isinstance(raw, (str, bytes, dict)) or not isinstance(raw, (list, tuple)):
        raise RewardError(
            f"The reward function returned {type(raw).__name__} on batch {batch_index}; it must return a list of floats, one per completion."
        )
    not_numbers = [(i, s) for i, s in enumerate(raw) if not isinstance(s, numbers.Real)]
    if not_numbers:
        i, s = not_numbers[0]
        raise RewardError(
            f"The reward function returned {type(s).__name__} {s!r} for completion {i} on batch {batch_index}; "
            "each score must be a number (int, float or a 0-d tensor's .item())."
        )
    if len(raw) != len(completions):
        raise RewardError(
            f"The reward function returned {len(raw)} scores for {len(completions)} completions on batch {batch_index}; "
            "it must return exactly one float per completion."
        )
    too_large = [(i, float(s)) for i, s in enumerate(raw) if math.isfinite(float(s)) and abs(float(s)) > FLOAT32_MAX]
    if too_large:
        i, s = too_large[0]
        raise RewardError(
            f"The reward function returned {s:g} for completion {i} on batch {batch_index}: finite, but beyond float32's "
            f"range (+-{FLOAT32_MAX:.3g}), in which the trainer computes. Rescale the reward (e.g. divide it or take a log)."
        )
    return torch.tensor([float(s) for s in raw], dtype=torch.float32)


def check_finite_scores(scores: torch.Tensor, prompts: list[str], completions: list[str], batch_index: int) -> None:
    """Raise `RewardError` naming the first non-finite score (for trainers without a non-finite guard)."""
    bad = [(i, s) for i, s in enumerate(scores.tolist()) if not math.isfinite(s)]
    if bad:
        i, s = bad[0]
        raise RewardError(
            f"The reward function returned {len(bad)} non-finite score(s) on batch {batch_index}, e.g. {s} for completion {i} "
            f"({completions[i]!r} after prompt {prompts[i]!r}); return finite floats (clip or replace NaN/inf)."
        )
