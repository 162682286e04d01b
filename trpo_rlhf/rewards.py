"""Rewards. A reward is a callable ``(prompts, completions) -> list[float]`` on texts, or, as TRL's
`reward_funcs` (`RewardFunctions`), one or several functions called with keywords, the dataset's
other columns among them, whose weighted sum is the score.

    >>> from trpo_rlhf.rewards import build_reward_fn
    >>> reward_fn = build_reward_fn("vader")
    >>> [round(s, 2) for s in reward_fn(["The film"], [" was wonderful and moving."])]
    [0.57]

`build_reward_fn` accepts such a callable as is, ``"vader"`` for the offline lexicon scorer, or
the hub id / local path of a `transformers` sequence classifier (scored with its own tokenizer).
"""

from __future__ import annotations

import copy
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
VADER = "vader"
# Dataset columns a reward function is not given, as TRL's GRPOTrainer leaves them out: the
# completion is the trainer's, not the dataset's.
COLUMNS_NOT_PASSED = ("completion", "completion_ids")


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
    from .loading import check_local_model_path

    check_local_model_path(reward, role="reward model", instead="a sequence classifier's hub id, or 'vader'")
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
    reward_fn: Callable,
    prompts: list,
    completions: list,
    batch_index: int,
    timeout: float | None = None,
    name: str | None = None,
    keywords: dict[str, object] | None = None,
) -> torch.Tensor:
    """Call the reward function (allowed `timeout` seconds) and check its answer: one number per
    completion. It is called as ``reward_fn(prompts, completions)``, or with `keywords` as TRL calls
    a reward function, ``reward_fn(prompts=..., completions=..., **keywords)``, where a None score
    (TRL's "does not apply") comes back as NaN.

    The function is handed copies of `prompts`, `completions` and the keywords' data (not of
    `trainer_state`): what it changes in them (a chat message edited, a list cleared) is its own,
    never the trainer's.

    Raises `RewardError` naming the function (`name`), the batch and the offending entry otherwise.
    Other non-finite numbers pass through: the trainer rejects that step's update and says so (see
    `RLTrainer.step`).
    """
    who = f"The reward function {name!r}" if name else "The reward function"
    allow_none = keywords is not None
    given_prompts, given_completions = copy.deepcopy(prompts), copy.deepcopy(completions)
    try:
        if keywords is None:
            raw = call_with_timeout(reward_fn, timeout, given_prompts, given_completions)
        else:
            # The trainer's state is the trainer's to share, as TRL shares it; the data are copies.
            given = {k: v if k == "trainer_state" else copy.deepcopy(v) for k, v in keywords.items()}
            raw = call_with_timeout(
                lambda: reward_fn(prompts=given_prompts, completions=given_completions, **given), timeout
            )
    except TimeoutError as exc:
        raise RewardError(
            f"{who} gave no scores for batch {batch_index} within reward_timeout={timeout:g} s "
            f"(first prompt {prompts[0]!r}): it is hung or too slow. Fix it, or raise --reward_timeout."
        ) from exc
    except Exception as exc:
        raise RewardError(
            f"{who} raised {type(exc).__name__} on batch {batch_index} "
            f"(first prompt {prompts[0]!r}, first completion {completions[0]!r}): {exc}"
        ) from exc
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):  # a tensor or an array
        raw = raw.tolist()
    # A string or a mapping is iterable too, but its characters or keys are not scores.
    if isinstance(raw, (str, bytes, dict)) or not isinstance(raw, (list, tuple)):
        raise RewardError(
            f"{who} returned {type(raw).__name__} on batch {batch_index}; it must return a list of floats, one per completion."
        )
    if allow_none:
        raw = [math.nan if s is None else s for s in raw]
    not_numbers = [(i, s) for i, s in enumerate(raw) if not isinstance(s, (numbers.Real, np.bool_))]
    if not_numbers:
        i, s = not_numbers[0]
        raise RewardError(
            f"{who} returned {type(s).__name__} {s!r} for completion {i} on batch {batch_index}; "
            f"each score must be a number (int, float or a 0-d tensor's .item()){' or None' if allow_none else ''}."
        )
    if len(raw) != len(completions):
        raise RewardError(
            f"{who} returned {len(raw)} scores for {len(completions)} completions on batch {batch_index}; "
            "it must return exactly one float per completion."
        )
    values = []
    for i, s in enumerate(raw):
        try:
            value = float(s)
        except OverflowError:  # a Python integer beyond even float64's range, e.g. 10**400
            value = None
        if value is None or (math.isfinite(value) and abs(value) > FLOAT32_MAX):
            shown = f"an integer of {len(str(abs(int(s))))} digits" if value is None else f"{value:g}"
            raise RewardError(
                f"{who} returned {shown} for completion {i} on batch {batch_index}: finite, but beyond float32's "
                f"range (+-{FLOAT32_MAX:.3g}), in which the trainer computes. Rescale the reward (e.g. divide it or "
                "take a log)."
            )
        values.append(value)
    return torch.tensor(values, dtype=torch.float32)


@dataclass
class RewardInputs:
    """What one batch's reward functions see. `prompts` and `completions` are the dataset's own
    (strings, or lists of chat messages for a conversational dataset, the completion as one assistant
    message); `prompt_texts` and `completion_texts` the strings the policy read and wrote; `columns`
    the dataset's other columns, one entry per completion."""

    prompts: list
    completions: list
    prompt_texts: list[str]
    completion_texts: list[str]
    completion_ids: list[list[int]]
    columns: dict[str, list] = field(default_factory=dict)

    @classmethod
    def of_rows(
        cls,
        rows: list[int],
        prompt_texts: list[str],
        prompt_messages: list | None,
        columns: dict[str, list],
        completions: list[str],
        completion_ids: list[list[int]],
    ) -> RewardInputs:
        """The inputs of `completions` of the dataset's `rows`: `prompt_texts` the dataset's prompts
        as the policy reads them, `prompt_messages` its chat messages (None for plain strings),
        `columns` its other columns (all but `COLUMNS_NOT_PASSED` reach the functions)."""
        texts = [prompt_texts[i] for i in rows]
        return cls(
            prompts=texts if prompt_messages is None else [prompt_messages[i] for i in rows],
            completions=(
                completions
                if prompt_messages is None
                else [[{"role": "assistant", "content": text}] for text in completions]
            ),
            prompt_texts=texts,
            completion_texts=completions,
            completion_ids=completion_ids,
            columns={
                name: [values[i] for i in rows] for name, values in columns.items() if name not in COLUMNS_NOT_PASSED
            },
        )


class RewardFunctions:
    """TRL's `reward_funcs`: one or several rewards whose weighted sum scores a completion.

    Each entry is a callable, called as TRL's GRPOTrainer calls one,
    ``f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)`` with the
    dataset's other columns as keyword lists (a None score: the function does not apply; the weighted
    sum skips it, as TRL's nansum), or a string: ``"vader"`` or the hub id / path of a sequence
    classifier, which score the texts. ``reward_fn``, this package's ``f(prompts, completions)``
    on texts, is one such function too (`from_reward_fn`).

        >>> def brevity(completions, **kwargs):
        ...     return [-len(c) for c in completions]
        >>> funcs = RewardFunctions([brevity, "vader"], weights=[0.1, 1.0])
        >>> funcs.names
        ['brevity', 'vader']
    """

    def __init__(self, reward_funcs, weights: Sequence[float] | None = None, device=None, text_only: bool = False):
        entries = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not entries:
            raise ValueError("reward_funcs is empty: pass a reward function, 'vader', or a classifier's id or path.")
        self.functions: list[Callable] = []
        self.keyword_call: list[bool] = []  # TRL's form; else (prompt_texts, completion_texts)
        names: list[str] = []
        for i, entry in enumerate(entries):
            if isinstance(entry, torch.nn.Module):
                raise TypeError(
                    f"reward_funcs[{i}] is a {type(entry).__name__} model: pass its hub id or local path (a string), "
                    "so that it is scored with its own tokenizer."
                )
            if isinstance(entry, str):
                self.functions.append(build_reward_fn(entry, device=device))
                self.keyword_call.append(False)
                names.append(VADER if entry.lower() == VADER else entry.rstrip("/").split("/")[-1])
            elif callable(entry):
                self.functions.append(entry)
                self.keyword_call.append(not text_only)
                names.append(getattr(entry, "__name__", type(entry).__name__))
            else:
                raise TypeError(
                    f"reward_funcs[{i}]={entry!r} is neither a callable nor a string: pass a function "
                    "f(prompts, completions, **kwargs) -> list[float], 'vader', or a classifier's id or path."
                )
        self.names = unique_names(names)
        if weights is not None and len(weights) != len(self.functions):
            raise ValueError(
                f"reward_weights has {len(weights)} weights for {len(self.functions)} reward functions "
                f"({self.names}): pass one weight per function."
            )
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * len(self.functions))

    @classmethod
    def from_reward_fn(cls, reward_fn: RewardFn | str, device=None) -> RewardFunctions:
        """The single reward `reward_fn(prompt_texts, completion_texts)` (or "vader", a classifier)."""
        return cls([build_reward_fn(reward_fn, device=device)], device=device, text_only=True)

    @classmethod
    def of_trainer(
        cls, reward_fn: RewardFn | str | None, reward_funcs, weights: Sequence[float] | None, device=None
    ) -> RewardFunctions:
        """A trainer's rewards: its `reward_fn` ("vader" when neither is given) or its `reward_funcs`
        weighted by `weights` (`reward_weights`), never both."""
        if reward_funcs is not None and reward_fn is not None:
            raise ValueError(
                "Both reward_fn and reward_funcs were given: pass one (reward_funcs takes a list, e.g. "
                "reward_funcs=[my_reward, 'vader'])."
            )
        if reward_funcs is None:
            if weights is not None:
                raise ValueError(
                    f"reward_weights={weights} weighs the functions of reward_funcs, but none were given: pass "
                    "reward_funcs=[...], or leave reward_weights unset."
                )
            return cls.from_reward_fn(VADER if reward_fn is None else reward_fn, device=device)
        return cls(reward_funcs, weights, device=device)

    def __call__(
        self, inputs: RewardInputs, batch_index: int, timeout: float | None = None, trainer_state=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the weighted sum [B], each function's scores [B] by name, NaN where it did not apply)."""
        each = {}
        for name, function, keyword_call in zip(self.names, self.functions, self.keyword_call):
            if keyword_call:
                keywords = {"completion_ids": inputs.completion_ids, "trainer_state": trainer_state, **inputs.columns}
                args = (inputs.prompts, inputs.completions)
            else:
                keywords, args = None, (inputs.prompt_texts, inputs.completion_texts)
            label = name if len(self.functions) > 1 or keyword_call else None
            each[name] = score_batch(function, *args, batch_index, timeout, name=label, keywords=keywords)
        if len(each) == 1 and not self.keyword_call[0]:
            return next(iter(each.values())), each
        table = torch.stack(list(each.values()), dim=1)
        unscored = torch.isnan(table).all(dim=1)
        if unscored.any():
            i = int(unscored.nonzero()[0])
            raise RewardError(
                f"No reward function scored completion {i} on batch {batch_index} ({inputs.completion_texts[i]!r} "
                f"after {inputs.prompt_texts[i]!r}): each of {self.names} returned None or NaN. Return a number from "
                "at least one of them for every completion."
            )
        return (table * self.weights).nansum(dim=1), each


def unique_names(names: list[str]) -> list[str]:
    """`names` with repeats (and `mean`, `std`, which `reward/` already logs) suffixed _2, _3, ...

    >>> unique_names(["f", "f", "mean"])
    ['f', 'f_2', 'mean_2']
    """
    taken, unique = {"mean", "std"}, []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def check_finite_scores(scores: torch.Tensor, prompts: list[str], completions: list[str], batch_index: int) -> None:
    """Raise `RewardError` naming the first non-finite score (for trainers without a non-finite guard)."""
    bad = [(i, s) for i, s in enumerate(scores.tolist()) if not math.isfinite(s)]
    if bad:
        i, s = bad[0]
        raise RewardError(
            f"The reward function returned {len(bad)} non-finite score(s) on batch {batch_index}, e.g. {s} for completion {i} "
            f"({completions[i]!r} after prompt {prompts[i]!r}); return finite floats (clip or replace NaN/inf)."
        )
