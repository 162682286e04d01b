"""The exact task: a tiny Llama pretrained on a word grammar, with completions short enough that
every one of them can be enumerated. A policy's expected reward and its KL to the reference are
then sums over all completions, not estimates, and so is the optimal reward-vs-KL frontier:
pi*_beta(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta), the maximiser of E[r] - beta KL(pi || pi_ref)
(Korbak et al. 2022; Rafailov et al. 2023, eq. 4).

    >>> task = build_task("exact", reward_model="sparse")       # doctest: +SKIP
    >>> evaluator = ExactEvaluator(task.tokenizer, task.prompts, EXACT_MAX_NEW_TOKENS, task.reward_model)  # doctest: +SKIP
    >>> evaluator(trainer)                                       # doctest: +SKIP
    {'exact/reward': 0.02, 'exact/kl_ref': 0.0}

Completions end at their first EOS (EOS absorbing) or after `max_new_tokens` tokens, exactly as
`rollout.sample_completions` samples them, and are scored decoded as the trainer scores them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..rollout import position_ids_from_mask

EXACT_MAX_NEW_TOKENS = 3
EXACT_REWARDS = ("dense", "sparse")
KL_BUDGETS = (0.25, 0.5, 1.0, 2.0)  # nats per completion
PRETRAIN = {"sentences": 4000, "steps": 300, "batch_size": 64, "lr": 1e-2, "hidden_size": 32, "num_layers": 2}
# Word pools the family's grammars draw their classes from (member 0 keeps its own lists).
POOLS = {
    "determiners": "the a my this that every some your our one".split(),
    "adjectives": "old new small big red quiet golden bright dark warm cold tall short green blue loud soft happy sad "
    "calm wild brave".split(),
    "nouns": "cat dog film song house city treasure river tree bird book road car boat garden window door letter "
    "friend child horse star".split(),
    "verbs": "sees likes finds makes paints hears opens builds reads follows".split(),
    "adverbs": "today again slowly quickly often there".split(),
}


@dataclass(frozen=True)
class Grammar:
    """One member of the exact-task family: a word grammar DET [ADJ] NOUN VERB DET [ADJ] NOUN [ADV]
    EOS (a prompt is a sentence up to its second determiner; the completion is the rest), whose
    `rare` words (rewarded) are rare under the reference; the reference's width; the completion
    length that is enumerated.

    `member(spec)` builds one from "seed=S,width=W,words=N,length=L"; seed 0 at the defaults is
    the exact task every earlier measurement used.
    """

    determiners: tuple[str, ...] = ("the", "a", "my", "this")
    adjectives: tuple[str, ...] = ("old", "new", "small", "big", "red", "quiet", "golden")
    nouns: tuple[str, ...] = ("cat", "dog", "film", "song", "house", "city", "treasure")
    verbs: tuple[str, ...] = ("sees", "likes", "finds", "makes")
    adverbs: tuple[str, ...] = ("today", "again", "slowly")
    rare: tuple[tuple[str, float], ...] = (("golden", 0.03), ("treasure", 0.02))  # each word's share of its class
    adjective_rate: float = 0.5
    adverb_rate: float = 0.3
    width: int = 32  # the reference's hidden size
    length: int = EXACT_MAX_NEW_TOKENS  # completion tokens enumerated
    seed: int = 0  # the reference's pretraining and the dense reward's order

    @property
    def spec(self) -> str:
        """The member's name, as `member` reads it."""
        return f"seed={self.seed},width={self.width},words={len(self.nouns)},length={self.length}"

    @property
    def words(self) -> list[str]:
        return sorted({*self.determiners, *self.adjectives, *self.nouns, *self.verbs, *self.adverbs})

    def pick(self, rng: random.Random, words: Sequence[str]) -> str:
        rare = dict(self.rare)
        common = [w for w in words if w not in rare]
        shares = [rare[w] if w in rare else (1 - sum(rare.get(r, 0) for r in words)) / len(common) for w in words]
        return rng.choices(words, shares)[0]

    def sentence(self, rng: random.Random) -> tuple[str, str]:
        """One sentence of the grammar, as (prompt, completion)."""

        def noun_phrase() -> list[str]:
            adjective = [self.pick(rng, self.adjectives)] if rng.random() < self.adjective_rate else []
            return adjective + [self.pick(rng, self.nouns)]

        prompt = [rng.choice(self.determiners), *noun_phrase(), rng.choice(self.verbs), rng.choice(self.determiners)]
        completion = noun_phrase() + ([rng.choice(self.adverbs)] if rng.random() < self.adverb_rate else [])
        return " ".join(prompt), " ".join(completion)


def member(spec: str | None = None) -> Grammar:
    """The family's member named by `spec`, "seed=S,width=W,words=N,length=L" (any part may be
    left out: seed 0, width 32, 7 adjectives and 7 nouns, 3 tokens). Seed 0 keeps the original
    grammar's words; another seed draws N adjectives and N nouns, 4 verbs, 3 adverbs and 4
    determiners from `POOLS`, one rare adjective and one rare noun (shares in [0.01, 0.05]), and
    the rates of the optional adjective and adverb.

    >>> member().spec, member("seed=0").nouns[-1]
    ('seed=0,width=32,words=7,length=3', 'treasure')
    >>> other = member("seed=3,width=64,words=10,length=2")
    >>> len(other.nouns), other.width, other.length, len(other.rare)
    (10, 64, 2, 2)
    """
    values = {"seed": 0, "width": 32, "words": 7, "length": EXACT_MAX_NEW_TOKENS}
    for part in filter(None, (spec or "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in values or not value.strip().isdigit():
            raise ValueError(
                f"exact task member {spec!r}: {part!r} is not KEY=NUMBER with KEY one of {sorted(values)}, e.g. "
                "'seed=1,width=64,words=10,length=2'."
            )
        values[key.strip()] = int(value)
    seed, width, words, length = values["seed"], values["width"], values["words"], values["length"]
    if not (2 <= words <= min(len(POOLS["adjectives"]), len(POOLS["nouns"])) and 1 <= length <= 3):
        raise ValueError(f"exact task member {spec!r}: words must be in [2, 22] and length in [1, 3].")
    if width < 8 or width % 4:
        raise ValueError(f"exact task member {spec!r}: width must be a multiple of 4 (four heads), at least 8.")
    if seed == 0 and words == 7:
        return Grammar(width=width, length=length)
    rng = random.Random(seed)
    adjectives, nouns = tuple(rng.sample(POOLS["adjectives"], words)), tuple(rng.sample(POOLS["nouns"], words))
    return Grammar(
        determiners=tuple(rng.sample(POOLS["determiners"], 4)),
        adjectives=adjectives,
        nouns=nouns,
        verbs=tuple(rng.sample(POOLS["verbs"], 4)),
        adverbs=tuple(rng.sample(POOLS["adverbs"], 3)),
        rare=((rng.choice(adjectives), rng.uniform(0.01, 0.05)), (rng.choice(nouns), rng.uniform(0.01, 0.05))),
        adjective_rate=rng.uniform(0.3, 0.7),
        adverb_rate=rng.uniform(0.1, 0.5),
        width=width,
        length=length,
        seed=seed,
    )


DEFAULT_GRAMMAR = Grammar()


class DenseWordReward:
    """The mean over the completion's words of a fixed score per word (the grammar's adjectives,
    nouns and adverbs spread over [-1, 1] in a seeded order; the rare words among the highest), 0
    for an empty completion. Dense: almost every completion scores differently."""

    def __init__(self, seed: int = 0, grammar: Grammar = DEFAULT_GRAMMAR):
        words = [*grammar.adjectives, *grammar.nouns, *grammar.adverbs]
        order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
        self.scores = {words[i]: -1.0 + 2.0 * rank / (len(words) - 1) for rank, i in enumerate(order)}

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        out = []
        for text in completions:
            words = text.split()
            out.append(sum(self.scores.get(w, -1.0) for w in words) / len(words) if words else 0.0)
        return out


class SparseWordReward:
    """1.0 where the completion holds one of the grammar's rare words (member 0's "golden",
    "treasure"), else 0.0."""

    def __init__(self, grammar: Grammar = DEFAULT_GRAMMAR):
        self.words = tuple(word for word, _ in grammar.rare)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(any(w in self.words for w in text.split())) for text in completions]


def exact_reward(name: str, grammar: Grammar = DEFAULT_GRAMMAR) -> Callable[[list[str], list[str]], list[float]]:
    if name not in EXACT_REWARDS:
        raise ValueError(f"exact reward {name!r} is not one of {EXACT_REWARDS}.")
    return DenseWordReward(grammar.seed, grammar) if name == "dense" else SparseWordReward(grammar)


# --------------------------------------------------------------------------------------------
# The reference model: pretrained once, cached
# --------------------------------------------------------------------------------------------
def exact_cache_dir(grammar: Grammar = DEFAULT_GRAMMAR) -> Path:
    root = os.environ.get("TRPO_RLHF_CACHE") or Path.home() / ".cache" / "trpo_rlhf"
    pretrain = {**PRETRAIN, "hidden_size": grammar.width}  # the same key order: member 0's cache keeps its name
    word_lists = [grammar.determiners, grammar.adjectives, grammar.nouns, grammar.verbs, grammar.adverbs]
    described = [pretrain, *word_lists, dict(grammar.rare)]
    if grammar.seed or (grammar.adjective_rate, grammar.adverb_rate) != (0.5, 0.3):
        described.append([grammar.seed, grammar.adjective_rate, grammar.adverb_rate])
    digest = hashlib.sha256(json.dumps(described).encode())
    return Path(root) / f"exact-{digest.hexdigest()[:12]}"


def build_grammar_tokenizer(grammar: Grammar = DEFAULT_GRAMMAR):
    from .toy import build_word_tokenizer

    return build_word_tokenizer(grammar.words)


def pretrain_reference(grammar: Grammar = DEFAULT_GRAMMAR):
    """A tiny Llama trained by maximum likelihood on the grammar's sentences (seeded; seconds on
    two cores) and its word-level tokenizer."""
    from .toy import build_tiny_lm

    seed = grammar.seed
    tokenizer = build_grammar_tokenizer(grammar)
    rng = random.Random(seed)
    texts = [" ".join(grammar.sentence(rng)) for _ in range(PRETRAIN["sentences"])]
    encoded = tokenizer([t + " [EOS]" for t in texts], padding=True, return_tensors="pt")
    model = build_tiny_lm(tokenizer, hidden_size=grammar.width, num_layers=PRETRAIN["num_layers"], seed=seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=PRETRAIN["lr"])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(PRETRAIN["steps"]):
        rows = torch.randint(len(texts), (PRETRAIN["batch_size"],), generator=generator)
        ids, mask = encoded["input_ids"][rows], encoded["attention_mask"][rows]
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def load_reference(grammar: Grammar = DEFAULT_GRAMMAR):
    """The pretrained reference and its tokenizer, from the cache (written on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exact_cache_dir(grammar)
    if not (folder / "config.json").exists():
        model, tokenizer = pretrain_reference(grammar)
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)  # another process may have cached it first: keep theirs
        except OSError:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def exact_prompts(count: int = 16, seed: int = 1, grammar: Grammar = DEFAULT_GRAMMAR) -> list[str]:
    """`count` distinct prompts of the grammar, in a fixed order."""
    rng, prompts = random.Random(seed), []
    while len(prompts) < count:
        prompt = grammar.sentence(rng)[0]
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


# --------------------------------------------------------------------------------------------
# Exact evaluation
# --------------------------------------------------------------------------------------------
LogitsFn = Callable[..., torch.Tensor]  # (input_ids, attention_mask, position_ids, response_length) -> [N, L, V]


class ExactEvaluator:
    """Every completion of every prompt, and the functions of a policy that are sums over them.

    The completions of one prompt are the leaves of a tree: every (L-1)-token prefix without EOS
    is run once through the model with a dummy last token, which gives the next-token distribution
    at every depth of its path; a leaf is a prefix followed by any token, or a shorter prefix
    followed by EOS. Call it on a trainer for `exact/reward` and `exact/kl_ref` (per completion,
    averaged over the prompts), or use `log_probs` and `expectations` with any model.
    """

    def __init__(
        self, tokenizer, prompts: Sequence[str], max_new_tokens: int, reward_fn: Callable, temperature: float = 1.0
    ):
        self.prompts, self.temperature = list(prompts), temperature
        vocab, eos = len(tokenizer), tokenizer.eos_token_id
        others = [t for t in range(vocab) if t != eos]
        length = max_new_tokens
        paths = list(itertools.product(others, repeat=length - 1))  # one empty prefix for one-token completions
        prefixes = torch.tensor(paths, dtype=torch.long).reshape(len(paths), length - 1)
        n = len(prefixes)
        self.paths = torch.cat([prefixes, torch.full((n, 1), others[0])], dim=1)  # [n, L]
        # Leaves: (prefix row, depth t, token): the path's first t tokens, then the token.
        full = [(r, length - 1, v) for r in range(n) for v in range(vocab)]
        early = [
            (r, t, eos)
            for t in range(length - 1)
            for r in range(n)
            if bool((prefixes[r, t:] == others[0]).all())  # one row stands for every path sharing the prefix
        ]
        self.leaf_row, self.leaf_depth, self.leaf_token = (torch.tensor(c) for c in zip(*(full + early)))
        leaf_ids = [prefixes[r, :t].tolist() + [v] for r, t, v in full + early]
        completions = tokenizer.batch_decode(leaf_ids, skip_special_tokens=True)
        enc = tokenizer(self.prompts, return_tensors="pt", padding=True, padding_side="left")
        self.prompt_ids, self.prompt_mask = enc["input_ids"], enc["attention_mask"]
        self.rewards = torch.tensor(
            [reward_fn([p] * len(completions), completions) for p in self.prompts], dtype=torch.float64
        )  # [P, leaves]
        self.completions = completions

    @property
    def leaves_per_prompt(self) -> int:
        return self.rewards.shape[1]

    def model_inputs(self, device) -> dict:
        """The batch of every prompt followed by every path: [P * n, prompt + L], left-padded."""
        p, n = len(self.prompts), len(self.paths)
        input_ids = torch.cat([self.prompt_ids.repeat_interleave(n, 0), self.paths.repeat(p, 1)], dim=1)
        attention_mask = torch.cat(
            [self.prompt_mask.repeat_interleave(n, 0), torch.ones(p * n, self.paths.shape[1], dtype=torch.long)], dim=1
        )
        position_ids = position_ids_from_mask(attention_mask)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device),
            "response_length": self.paths.shape[1],
        }

    @torch.no_grad()
    def log_probs(self, logits_fn: LogitsFn, device="cpu", chunk: int = 4096) -> torch.Tensor:
        """log pi(y | x) of every leaf y of every prompt x: [P, leaves], float64. `logits_fn` takes
        `model_inputs` and returns the logits / temperature at the response positions."""
        inputs = self.model_inputs(device)
        rows = inputs["input_ids"].shape[0]
        logp = torch.cat(
            [
                torch.log_softmax(
                    logits_fn(**{k: v[s : s + chunk] if torch.is_tensor(v) else v for k, v in inputs.items()}).double(),
                    -1,
                ).cpu()
                for s in range(0, rows, chunk)
            ]
        )  # [P * n, L, V]
        p, n, length = len(self.prompts), len(self.paths), self.paths.shape[1]
        logp = logp.reshape(p, n, length, -1)
        taken = logp.gather(-1, self.paths.expand(p, n, length).unsqueeze(-1)).squeeze(-1)  # [P, n, L]
        before = torch.cat([torch.zeros(p, n, 1, dtype=taken.dtype), taken.cumsum(-1)[..., :-1]], dim=-1)
        path = before[:, self.leaf_row, self.leaf_depth]
        return path + logp[:, self.leaf_row, self.leaf_depth, self.leaf_token]

    def expectations(self, logp: torch.Tensor, logp_ref: torch.Tensor) -> dict[str, float]:
        """E_pi[r] and KL(pi || pi_ref) per completion, averaged over the prompts."""
        probs = logp.exp()
        return {
            "exact/reward": (probs * self.rewards).sum(-1).mean().item(),
            "exact/kl_ref": (probs * (logp - logp_ref)).sum(-1).mean().item(),
        }

    def __call__(self, trainer) -> dict[str, float]:
        """The trainer's current policy against its reference (a metric hook of `RLTrainer`)."""
        ac, device = trainer.actor_critic, trainer.device
        logp = self.log_probs(lambda **kw: ac.policy_logits(**kw, temperature=self.temperature), device)
        if not hasattr(self, "_reference"):
            self._reference = self.log_probs(
                lambda **kw: ac.reference_logits(**kw, temperature=self.temperature), device
            )
        return self.expectations(logp, self._reference)

    def of_peft_model(self, model) -> dict[str, float]:
        """A PEFT policy (TRL's) against its base, the adapter disabled, in eval mode (no dropout)."""
        device, training = next(model.parameters()).device, model.training

        def logits(input_ids, attention_mask, position_ids, response_length):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return out.logits[:, -response_length - 1 : -1].float() / self.temperature

        model.eval()
        try:
            logp = self.log_probs(logits, device)
            if not hasattr(self, "_reference"):
                with model.disable_adapter():
                    self._reference = self.log_probs(logits, device)
        finally:
            model.train(training)
        return self.expectations(logp, self._reference)


# --------------------------------------------------------------------------------------------
# The optimal frontier and a run's share of it
# --------------------------------------------------------------------------------------------
def optimal_point(logp_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> tuple[float, float]:
    """(KL(pi*_beta || pi_ref), E_pi*_beta[r]) per completion, averaged over prompts, for
    pi*_beta ∝ pi_ref exp(r / beta)."""
    logp = logp_ref + rewards / beta
    logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    probs = logp.exp()
    return (probs * (logp - logp_ref)).sum(-1).mean().item(), (probs * rewards).sum(-1).mean().item()


def optimal_reward_at_kl(logp_ref: torch.Tensor, rewards: torch.Tensor, budget: float) -> float:
    """The largest expected reward of any policy within `budget` nats of KL to the reference: that
    of pi*_beta whose KL is the budget (KL falls as beta grows; found by bisection on log beta)."""
    low, high = math.log(1e-4), math.log(1e4)  # betas: KL(low) is the largest, KL(high) ~ 0
    if optimal_point(logp_ref, rewards, math.exp(low))[0] <= budget:
        return optimal_point(logp_ref, rewards, math.exp(low))[1]
    for _ in range(60):
        middle = (low + high) / 2
        if optimal_point(logp_ref, rewards, math.exp(middle))[0] > budget:
            low = middle
        else:
            high = middle
    return optimal_point(logp_ref, rewards, math.exp(high))[1]


def optimal_curve(logp_ref: torch.Tensor, rewards: torch.Tensor, points: int = 40) -> list[tuple[float, float]]:
    """(KL, reward) of pi*_beta over a log-spaced grid of beta, from the reference outwards."""
    betas = torch.logspace(2, -2, points).tolist()
    return [optimal_point(logp_ref, rewards, beta) for beta in betas]


def frontier_efficiency(
    rows: Sequence[dict], optimum: dict[float, float], reference_reward: float, budgets: Sequence[float] = KL_BUDGETS
) -> dict[str, float]:
    """Per KL budget: (the best `exact/reward` of any step whose `exact/kl_ref` is within the
    budget, the reference counting as a step - the reference's reward) / (the optimum's - the
    reference's). 1 is the optimal policy; 0 no gain within the budget.

    >>> frontier_efficiency([{"exact/reward": 0.5, "exact/kl_ref": 0.4}], {0.25: 0.6, 0.5: 0.9}, 0.1, (0.25, 0.5))
    {'0.25': 0.0, '0.5': 0.5}
    """
    out = {}
    for budget in budgets:
        within = [r["exact/reward"] for r in rows if "exact/reward" in r and r["exact/kl_ref"] <= budget]
        best = max([reference_reward, *within])
        out[f"{float(budget)}"] = (best - reference_reward) / (optimum[budget] - reference_reward)
    return out


# --------------------------------------------------------------------------------------------
# Over seeds: the comparison's table and plot
# --------------------------------------------------------------------------------------------
def reference_and_optimum(task, max_new_tokens: int, temperature: float = 1.0, budgets=KL_BUDGETS) -> dict:
    """The reference's exact reward, the optimal reward at each KL budget, and the optimal curve,
    for `task` (its model taken as the reference)."""
    evaluator = ExactEvaluator(task.tokenizer, task.prompts, max_new_tokens, task.reward_model, temperature)
    model = task.model

    def logits(input_ids, attention_mask, position_ids, response_length):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits[:, -response_length - 1 : -1].float() / temperature

    logp_ref = evaluator.log_probs(logits)
    return {
        "reference_reward": evaluator.expectations(logp_ref, logp_ref)["exact/reward"],
        "optimum": {f"{float(b)}": optimal_reward_at_kl(logp_ref, evaluator.rewards, b) for b in budgets},
        "curve": optimal_curve(logp_ref, evaluator.rewards),
    }


def efficiency_over_seeds(seeds: Sequence[Sequence[dict]], exact: dict) -> dict[str, dict] | None:
    """`frontier_efficiency` of each seed's run, as mean and standard error over seeds per budget;
    None where the runs logged no exact metrics (TRL's PPO)."""
    if not all(any("exact/reward" in row for row in rows) for rows in seeds):
        return None
    optimum = {float(b): r for b, r in exact["optimum"].items()}
    per_seed = [frontier_efficiency(rows, optimum, exact["reference_reward"], tuple(optimum)) for rows in seeds]
    out = {}
    for budget in per_seed[0]:
        values = [e[budget] for e in per_seed]
        mean = sum(values) / len(values)
        se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5 if len(values) > 1 else 0.0
        out[budget] = {"mean": mean, "se": se, "seeds": len(values)}
    return out


def efficiency_table(results: dict[str, dict], exact: dict, labels: dict[str, str]) -> str:
    """Markdown: each variant's frontier efficiency (mean ± standard error over seeds) per budget."""
    budgets = list(exact["optimum"])
    lines = [
        "| variant | " + " | ".join(f"efficiency @ {b} nats" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
        "| optimum: reward | " + " | ".join(f"{exact['optimum'][b]:.3f}" for b in budgets) + " |",
    ]
    for variant, result in results.items():
        efficiency = result.get("frontier_efficiency")
        cells = (
            [f"{efficiency[b]['mean']:.3f} ± {efficiency[b]['se']:.3f}" for b in budgets]
            if efficiency
            else ["not measured"] * len(budgets)
        )
        lines.append(f"| {labels[variant]} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nReference reward {exact['reference_reward']:.4f}; efficiency = (best exact reward within the budget - the reference's) / (the optimum's - the reference's)."
    )
    return "\n".join(lines)


def plot_exact(
    runs: dict[str, list[list[dict]]], exact: dict, output_path, labels: dict[str, str], title: str | None = None
):
    """Left: the exact reward by step (mean over seeds). Right: each run's exact (KL, reward)
    trajectory, seeds faint, against the optimal frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import save_figure

    fig, (by_step, by_kl) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = iter(plt.cm.tab10.colors * 3)
    kl, reward = zip(*exact["curve"])
    by_kl.plot(kl, reward, color="black", lw=2, label="optimal pi*_beta")
    kl_top = 0.0
    for variant, seeds in runs.items():
        measured = [[r for r in rows if "exact/reward" in r] for rows in seeds]
        if not all(measured):
            continue
        color = next(colors)
        n = min(len(rows) for rows in measured)
        mean = [sum(rows[i]["exact/reward"] for rows in measured) / len(measured) for i in range(n)]
        by_step.plot(range(1, n + 1), mean, color=color, label=f"{labels[variant]} ({len(seeds)} seeds)")
        for k, rows in enumerate(measured):
            xs = [0.0] + [r["exact/kl_ref"] for r in rows]
            kl_top = max(kl_top, *xs)
            by_kl.plot(
                xs,
                [exact["reference_reward"]] + [r["exact/reward"] for r in rows],
                color=color,
                alpha=0.35,
                lw=0.8,
                label=labels[variant] if k == 0 else None,
            )
    by_kl.set_xlim(0, max(kl_top, max(float(b) for b in exact["optimum"])) * 1.05)
    by_step.set(xlabel="step", ylabel="exact reward", title="exact reward vs step (mean over seeds)")
    by_kl.set(
        xlabel="exact KL to the reference (nats per completion)",
        ylabel="exact reward",
        title="trajectories against the optimal frontier",
    )
    for ax in (by_step, by_kl):
        ax.legend(fontsize=8)
    return save_figure(fig, (by_step, by_kl), output_path, title)
