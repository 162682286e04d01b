"""The exact task: every completion enumerated, so the expected reward, the KL to the reference and
the optimal frontier are sums, checked by hand and against sampling."""

import json
import math

import pytest
import torch
from test_checkpoints import assert_same_tensors, tensors

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments import build_task
from trpo_rlhf.experiments.exact import (
    KL_BUDGETS,
    ExactEvaluator,
    SparseWordReward,
    build_grammar_tokenizer,
    efficiency_over_seeds,
    efficiency_table,
    exact_cache_dir,
    frontier_efficiency,
    member,
    optimal_curve,
    optimal_reward_at_kl,
    plot_exact,
    reference_and_optimum,
)


@pytest.fixture(scope="module")
def task():
    return build_task("exact", reward_model="dense")


def trainer_on(task, output_dir, **settings):
    """A TRPOTrainer on a fresh copy of the task's model (a trainer adds its adapters to the model)."""
    task = build_task("exact", reward_model="dense")
    config = TRPOConfig(
        output_dir=str(output_dir),
        max_new_tokens=3,
        lora_target_modules=task.lora_target_modules,
        value_epochs=1,
        **({"max_steps": 2, "batch_size": 16} | settings),
    )
    return TRPOTrainer(config, task.model, task.tokenizer, task.reward_model, task.prompts)


def perturb_policy(trainer, scale=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.actor_critic.policy_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def test_a_uniform_policy_by_hand():
    """All-zero logits: each token has probability 1/V at every position, so with two new tokens
    the completions holding "golden" or "treasure" weigh (2V + 2(V - 3)) / V^2: either word first
    (then any token), or another non-EOS token first and either word second."""
    tokenizer = build_grammar_tokenizer()
    vocab = len(tokenizer)
    evaluator = ExactEvaluator(tokenizer, ["the cat sees a"], 2, SparseWordReward())
    assert evaluator.leaves_per_prompt == (vocab - 1) * vocab + 1

    def uniform(input_ids, attention_mask, position_ids, response_length):
        return torch.zeros(input_ids.shape[0], response_length, vocab)

    logp = evaluator.log_probs(uniform)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    exact = evaluator.expectations(logp, logp)
    assert exact["exact/reward"] == pytest.approx((2 * vocab + 2 * (vocab - 3)) / vocab**2, abs=1e-12)
    assert exact["exact/kl_ref"] == 0.0


def test_a_leaf_is_the_product_of_its_next_token_probabilities(task):
    """Each enumerated completion's log-probability against a forward of that completion alone."""
    evaluator = ExactEvaluator(task.tokenizer, task.prompts[:2], 3, task.reward_model)
    model = task.model

    def logits(input_ids, attention_mask, position_ids, response_length):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits[:, -response_length - 1 : -1].float()

    logp = evaluator.log_probs(logits)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-9)
    eos = task.tokenizer.eos_token_id
    for leaf in (0, 17, evaluator.leaves_per_prompt - 1):  # a full-length completion, another, one ending early
        tokens = [int(t) for t in evaluator.paths[evaluator.leaf_row[leaf], : evaluator.leaf_depth[leaf]]]
        tokens.append(int(evaluator.leaf_token[leaf]))
        ids = task.tokenizer(task.prompts[1])["input_ids"]
        with torch.no_grad():
            out = torch.log_softmax(model(input_ids=torch.tensor([ids + tokens])).logits[0].double(), -1)
        by_hand = sum(out[len(ids) - 1 + i, t].item() for i, t in enumerate(tokens))
        assert logp[1, leaf].item() == pytest.approx(by_hand, abs=1e-5), (leaf, tokens)
    assert int(evaluator.leaf_token[-1]) == eos


def test_exact_reward_and_kl_agree_with_sampling(task, tmp_path):
    """A perturbed policy: 2048 sampled completions' mean reward and summed log-ratio to the
    reference are within four standard errors of the exact values."""
    trainer = trainer_on(task, tmp_path / "run", batch_size=256)
    perturb_policy(trainer)
    exact = ExactEvaluator(task.tokenizer, task.prompts, 3, task.reward_model)(trainer)
    assert exact["exact/kl_ref"] > 0.2  # far enough from the reference for the check to mean something
    torch.manual_seed(0)
    rewards, log_ratios = [], []
    for _ in range(8):
        batch, _ = trainer.collect_batch()
        rewards.append(batch.scores)
        log_ratios.append(((batch.logp_old - batch.logp_ref) * batch.response_mask).sum(1))
    for key, samples in (("exact/reward", torch.cat(rewards)), ("exact/kl_ref", torch.cat(log_ratios))):
        standard_error = samples.std().item() / math.sqrt(len(samples))
        assert abs(samples.mean().item() - exact[key]) < 4 * standard_error, (key, samples.mean().item(), exact[key])


def test_no_policy_beats_the_optimal_frontier(task, tmp_path):
    evaluator = ExactEvaluator(task.tokenizer, task.prompts, 3, task.reward_model)
    trainer = trainer_on(task, tmp_path / "run")
    reference = evaluator(trainer)
    logp_ref = evaluator._reference
    optimum = [optimal_reward_at_kl(logp_ref, evaluator.rewards, budget) for budget in KL_BUDGETS]
    assert reference["exact/reward"] < optimum[0] < optimum[1] < optimum[2] < optimum[3]
    assert optimal_reward_at_kl(logp_ref, evaluator.rewards, 1e-9) == pytest.approx(reference["exact/reward"], abs=1e-3)
    curve = optimal_curve(logp_ref, evaluator.rewards)
    assert all(a[0] <= b[0] + 1e-12 and a[1] <= b[1] + 1e-12 for a, b in zip(curve, curve[1:]))
    for seed in range(3):
        perturb_policy(trainer, scale=0.3, seed=seed)
        point = evaluator(trainer)
        assert point["exact/reward"] <= optimal_reward_at_kl(logp_ref, evaluator.rewards, point["exact/kl_ref"]) + 1e-9
        optimal = dict(zip(KL_BUDGETS, optimum))
        assert all(0 <= e <= 1 for e in frontier_efficiency([point], optimal, reference["exact/reward"]).values())


def test_the_exact_metrics_are_logged_and_leave_the_run_as_it_is(task, tmp_path):
    plain = trainer_on(task, tmp_path / "plain")
    plain_rows = plain.train()
    hooked = trainer_on(task, tmp_path / "hooked")
    hooked.metric_hooks.append(ExactEvaluator(task.tokenizer, task.prompts, 3, task.reward_model))
    rows = hooked.train()
    assert all(r["exact/kl_ref"] > 0 and math.isfinite(r["exact/reward"]) for r in rows)
    assert_same_tensors(tensors(plain), tensors(hooked))
    assert [r["reward/mean"] for r in rows] == [r["reward/mean"] for r in plain_rows]


def test_the_exact_task_refuses_what_it_does_not_take():
    with pytest.raises(ValueError, match=r"reward_model one of \('dense', 'sparse'\)"):
        build_task("exact", reward_model="vader")


def test_efficiency_over_seeds_gives_mean_and_standard_error_per_budget(tmp_path):
    exact = {
        "reference_reward": 0.0,
        "optimum": {"0.5": 1.0, "1.0": 2.0},
        "curve": [(0.0, 0.0), (0.5, 1.0), (1.0, 2.0)],
    }
    seeds = [
        [{"exact/reward": 0.5, "exact/kl_ref": 0.4}, {"exact/reward": 1.0, "exact/kl_ref": 0.9}],
        [{"exact/reward": 0.3, "exact/kl_ref": 0.5}, {"exact/reward": 2.0, "exact/kl_ref": 1.5}],
    ]
    efficiency = efficiency_over_seeds(seeds, exact)
    # Seed 0: 0.5 within 0.5 nats, 1.0 within 1; seed 1: 0.3 and 0.3 (its 2.0 is beyond the budget).
    assert efficiency["0.5"] == {"mean": pytest.approx(0.4), "se": pytest.approx(0.1), "seeds": 2}
    assert efficiency["1.0"] == {"mean": pytest.approx((0.5 + 0.15) / 2), "se": pytest.approx(0.175), "seeds": 2}
    assert efficiency_over_seeds([[{"reward/mean": 1.0}]], exact) is None  # a run without exact metrics
    table = efficiency_table(
        {"trpo": {"frontier_efficiency": efficiency}, "trl_ppo": {"frontier_efficiency": None}},
        exact,
        {"trpo": "TRPO", "trl_ppo": "TRL"},
    )
    assert "| TRPO | 0.400 ± 0.100 | 0.325 ± 0.175 |" in table and "| TRL | not measured | not measured |" in table
    png = plot_exact({"trpo": seeds}, exact, tmp_path / "compare.png", {"trpo": "TRPO"})
    assert png.stat().st_size > 10_000


def test_a_peft_policy_such_as_trls_is_evaluated_against_its_base_in_eval_mode(tmp_path):
    from peft import LoraConfig, get_peft_model

    from trpo_rlhf.experiments.trl_adapter import MetricsJsonl

    task = build_task("exact", reward_model="sparse")
    evaluator = ExactEvaluator(task.tokenizer, task.prompts[:4], 3, task.reward_model)
    policy = get_peft_model(task.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    policy.train()
    at_init = evaluator.of_peft_model(policy)  # LoRA's B = 0: the policy is its base
    assert abs(at_init["exact/kl_ref"]) < 1e-9 and policy.training
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    moved = evaluator.of_peft_model(policy)
    assert moved["exact/kl_ref"] > 0.01 and moved == evaluator.of_peft_model(policy)  # deterministic: no dropout
    callback = MetricsJsonl(tmp_path / "metrics.jsonl", torch.device("cpu"), policy, [evaluator.of_peft_model])
    state = type("State", (), {"is_world_process_zero": True})()
    callback.on_log(None, state, None, logs={"objective/scores": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward/mean"] == 0.5 and rows[0]["exact/kl_ref"] == moved["exact/kl_ref"]


LEARNING_SEEDS = (0, 1)
LEARNING_BUDGET = 0.5  # nats per completion
# Measured 2026-12-07 on the 2-core CPU (12 steps of 16 completions, dense reward), the TRPO defaults
# (relative damping 0.1, 4 CG iterations, delta 0.01 per completion) on these seeds: member 0 (the
# original task) 0.873 and 0.894 of the optimal gain within 0.5 nats (0.884); the 2-token member of
# width 16 0.883 and 0.915 (0.899). On member 0 the one-iteration step gave 0.708 and delta 0.034 0.622 (under
# the former defaults): a change that loses the natural gradient or the finer trust region fails.
LEARNING_THRESHOLD = 0.80


@pytest.mark.parametrize("spec", ["seed=0", "seed=2,width=16,words=5,length=2"])
def test_the_default_update_learns_a_share_of_the_optimal_gain_on_members_of_the_exact_family(spec, tmp_path):
    length = member(spec).length
    exact = reference_and_optimum(build_task("exact", member=spec), length, budgets=(LEARNING_BUDGET,))
    efficiencies = []
    for seed in LEARNING_SEEDS:
        task = build_task("exact", member=spec)
        config = TRPOConfig(
            output_dir=str(tmp_path / f"seed-{seed}"),
            max_new_tokens=length,
            lora_target_modules=task.lora_target_modules,
            value_epochs=1,
            max_steps=12,
            batch_size=16,
            seed=seed,
        )
        trainer = TRPOTrainer(config, task.model, task.tokenizer, task.reward_model, task.prompts)
        trainer.metric_hooks.append(ExactEvaluator(trainer.tokenizer, trainer.prompts, length, trainer.reward_fn))
        rows = trainer.train()
        optimum = {LEARNING_BUDGET: exact["optimum"][str(LEARNING_BUDGET)]}
        efficiencies.append(frontier_efficiency(rows, optimum, exact["reference_reward"], (LEARNING_BUDGET,)))
    mean = sum(e[str(LEARNING_BUDGET)] for e in efficiencies) / len(efficiencies)
    assert mean >= LEARNING_THRESHOLD, efficiencies


# ------------------------------------------------------------------ the family (issue 43)
def test_member_zero_is_the_original_task_and_other_members_differ():
    import random

    original = member()
    assert original == member("seed=0,width=32,words=7,length=3")
    assert exact_cache_dir(original).name == "exact-72d5760e634f"  # the name every earlier run cached it under
    assert original.sentence(random.Random(0)) == ("this film finds this", "red dog")
    other = member("seed=3,width=128,words=12,length=2")
    assert (other.width, other.length, len(other.adjectives), len(other.nouns)) == (128, 2, 12, 12)
    assert {w for w, _ in other.rare} <= {*other.adjectives, *other.nouns} and exact_cache_dir(
        other
    ) != exact_cache_dir(original)
    assert member("seed=3,width=128,words=12,length=2") == other  # a seed names one grammar
    for bad in ("seed=x", "depth=3", "words=40", "length=4", "width=30"):
        with pytest.raises(ValueError, match="exact task member"):
            member(bad)


def test_one_token_completions_are_enumerated_over_the_whole_vocabulary(task):
    """The exact_lm task's shape (one token, every one of the vocabulary) on the grammar's model: the
    leaves are the vocabulary, their probabilities the next-token softmax, and they sum to one."""
    evaluator = ExactEvaluator(task.tokenizer, task.prompts[:3], 1, task.reward_model)
    assert evaluator.leaves_per_prompt == len(task.tokenizer)
    model = task.model

    def logits(input_ids, attention_mask, position_ids, response_length):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits[:, -response_length - 1 : -1].float()

    logp = evaluator.log_probs(logits)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, dtype=logp.dtype))
    enc = task.tokenizer(task.prompts[0], return_tensors="pt")
    with torch.no_grad():
        direct = torch.log_softmax(model(**enc).logits[0, -1].double(), -1)
    assert torch.allclose(logp[0], direct, atol=1e-5)


def test_the_exact_lm_task_is_smollm2_one_token_after_review_openings():
    from trpo_rlhf.experiments.tasks import ThresholdReward, exact_lm_reward
    from trpo_rlhf.rewards import VaderReward

    dense = build_task("exact_lm")
    assert len(dense.prompts) == 16 and dense.prompts[0] == "A strange thing about this film is"
    assert type(dense.model).__name__ == "LlamaForCausalLM" and len(dense.tokenizer) == 49152
    assert isinstance(dense.reward_model, VaderReward) and isinstance(exact_lm_reward("sparse"), ThresholdReward)
    assert dense.reward_model(["x"] * 2, [" wonderful", " table"])[0] > 0.5
    with pytest.raises(ValueError, match="takes reward_model one of"):
        build_task("exact_lm", reward_model="vader")
