"""`kl_penalty`: how the gradient of the KL to the reference is estimated (the sampled log-ratio in
the reward, or exactly over the vocabulary: in the reward and the objective, or in the objective alone)."""

import dataclasses

import pytest
import torch
from conftest import bitwise_equal, policy_snapshot

from trpo_rlhf import PPOConfig, PPOTrainer, TRPOConfig
from trpo_rlhf.advantages import gae, masked_mean, masked_whiten, token_rewards, whitening_factor
from trpo_rlhf.engine import reference_kl_term
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordCountReward, WordScoreReward, build_tiny_lm
from trpo_rlhf.rollout import Rollout, token_logprobs
from trpo_rlhf.trust_region import categorical_kl, flat_grad


def move_off_the_reference(trainer, scale=0.3):
    """LoRA B = 0 at init makes the policy the reference, and every KL to it 0."""
    with torch.no_grad():
        for p in trainer.actor_critic.policy_parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def vocabulary_log_probs(trainer, batch, reference=False):
    inputs = dict(**batch.model_inputs(), temperature=trainer.config.temperature)
    ac = trainer.actor_critic
    logits = ac.reference_logits(**inputs) if reference else ac.policy_logits(**inputs)
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("kl_penalty", ["reward", "exact", "loss"])
def test_the_rollout_holds_the_exact_kl_to_the_reference_where_the_penalty_needs_it(make_trainer, kl_penalty):
    trainer = make_trainer(kl_penalty=kl_penalty, temperature=0.8)
    move_off_the_reference(trainer)
    batch, stats = trainer.collect_batch()
    if kl_penalty == "reward":
        assert batch.kl_ref is None and batch.ref_log_probs is None and "kl/ref_exact" not in stats
        return
    with torch.no_grad():
        policy, reference = vocabulary_log_probs(trainer, batch), vocabulary_log_probs(trainer, batch, reference=True)
    mask = batch.response_mask
    expected = categorical_kl(policy, reference) * mask
    torch.testing.assert_close(batch.kl_ref, expected, rtol=1e-4, atol=1e-6)
    assert (batch.kl_ref[mask.bool()] > 0).all()
    assert stats["kl/ref_exact"] == pytest.approx(expected.sum(dim=1).mean().item(), rel=1e-4)
    torch.testing.assert_close(batch.ref_log_probs, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kl_penalty", ["reward", "exact", "loss"])
def test_the_advantages_carry_the_penalty_of_their_mode_and_the_objective_its_weight(make_trainer, kl_penalty):
    """'reward' and 'exact' subtract beta times the sampled log-ratio or the exact KL from the
    reward, 'loss' leaves the score alone; both exact modes weigh the objective's KL term by
    beta / sigma, sigma the whitening scale, so that the gradient stays that of E[score] - beta KL."""
    beta = 0.2
    trainer = make_trainer(kl_penalty=kl_penalty, init_kl_coef=beta)
    move_off_the_reference(trainer)
    batch, stats = trainer.collect_batch()
    mask = batch.response_mask
    token_kl = {
        "reward": batch.logp_old - batch.logp_ref,
        "exact": batch.kl_ref,
        "loss": torch.zeros_like(mask),
    }[kl_penalty]
    rewards = token_rewards(batch.scores, token_kl, mask, beta)
    advantages, returns = gae(rewards, batch.values, mask, trainer.config.gamma, trainer.config.gae_lambda)
    torch.testing.assert_close(batch.returns, returns)
    torch.testing.assert_close(batch.advantages, masked_whiten(advantages, mask))
    expected_coef = beta * whitening_factor(advantages, mask).item() if kl_penalty != "reward" else 0.0
    assert batch.kl_loss_coef == pytest.approx(expected_coef, rel=1e-6)
    if kl_penalty != "reward":
        assert expected_coef != pytest.approx(beta, rel=0.05)  # whitening's scale really is in it
        assert stats["kl/loss_coef"] == pytest.approx(expected_coef, rel=1e-6)
    else:
        assert "kl/loss_coef" not in stats


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_loss_terms_gradient_is_that_of_the_surrogate_minus_the_exact_kl(make_trainer, chunks):
    """kl_penalty 'loss': g = grad [mean_t ratio_t A_t - c mean_t KL(pi_theta(.|s_t) || pi_ref(.|s_t))],
    recomputed here by hand, in chunks of sequences and in the single pass that also builds the
    Fisher's graph (three CG iterations), where the step's line search measures the same objective."""
    trainer = make_trainer(kl_penalty="loss", init_kl_coef=10.0, fisher_chunks=chunks, cg_iters=3)
    move_off_the_reference(trainer)
    batch, _ = trainer.collect_batch()
    params = trainer.actor_critic.policy_parameters()
    mask = batch.response_mask

    def objective(batch):
        logits = trainer.policy_logits(batch)
        ratio = torch.exp(token_logprobs(logits, batch.response_ids) - batch.logp_old)
        kl = categorical_kl(torch.log_softmax(logits, dim=-1), batch.ref_log_probs)
        return masked_mean(ratio * batch.advantages, mask) - batch.kl_loss_coef * masked_mean(kl, mask)

    expected = flat_grad(objective(batch), params)
    without_kl = flat_grad(objective(dataclasses.replace(batch, kl_loss_coef=0.0)), params)
    assert (expected - without_kl).norm() > 0.05 * expected.norm()  # the KL term is a real share of g
    grad, _, _ = trainer.chunked_gradient(batch, chunks)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())

    with torch.no_grad():
        before = objective(batch).item()
    stats = trainer.policy_update(batch)
    assert stats["trpo/grad_norm"] == pytest.approx(expected.norm().item(), rel=1e-4)
    assert stats["trpo/accepted"] == 1.0
    with torch.no_grad():
        after = objective(batch).item()
    assert stats["trpo/surrogate_gain"] == pytest.approx(after - before, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("algorithm", ["trpo", "ppo"])
def test_an_update_on_the_kl_term_alone_moves_the_policy_back_towards_the_reference(
    make_trainer, word_tokenizer, tmp_path, algorithm
):
    """With every advantage 0, kl_penalty 'loss' leaves one signal: the exact KL to the reference,
    which each trainer's update must then lower."""
    if algorithm == "trpo":
        trainer = make_trainer(kl_penalty="loss", max_kl=0.01)
    else:
        config = PPOConfig(
            output_dir=str(tmp_path / "ppo"),
            batch_size=8,
            max_new_tokens=6,
            lora_target_modules=["q_proj", "v_proj"],
            kl_penalty="loss",
            learning_rate=1e-3,
        )
        trainer = PPOTrainer(config, build_tiny_lm(word_tokenizer), word_tokenizer, WordCountReward(), TOY_PROMPTS)
    move_off_the_reference(trainer)
    batch, _ = trainer.collect_batch()
    batch = dataclasses.replace(batch, advantages=torch.zeros_like(batch.advantages), kl_loss_coef=1.0)

    def kl_to_reference():
        with torch.no_grad():
            kl = categorical_kl(vocabulary_log_probs(trainer, batch), batch.ref_log_probs)
        return masked_mean(kl, batch.response_mask).item()

    before_kl, before = kl_to_reference(), policy_snapshot(trainer)
    stats = trainer.policy_update(batch)
    assert kl_to_reference() < before_kl
    assert stats[f"{algorithm}/surrogate_gain"] > 0  # the objective is -KL here: it rose
    assert not bitwise_equal(before, policy_snapshot(trainer))


def test_the_objectives_kl_term_has_the_expected_gradient_of_the_sampled_penalty():
    """The sampled penalty's score-function term, grad log pi(a) * (log pi(a) - log pi_ref(a)) with
    a ~ pi, is in expectation the gradient of KL(pi || pi_ref) at that state: what the objective's
    exact term differentiates. A KL in the reward, which does not depend on a, carries none of it,
    which is why 'exact' needs the term beside its reward."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=generator, requires_grad=True)
    ref_log_probs = torch.log_softmax(torch.randn(2, 3, 11, generator=generator), dim=-1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = Rollout(
        prompts=["a", "b"],
        completions=["", ""],
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5),
        response_mask=mask,
        ref_log_probs=ref_log_probs,
        kl_loss_coef=0.7,
    )
    (term_grad,) = torch.autograd.grad(reference_kl_term(batch, torch.log_softmax(logits, dim=-1)), logits)
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        log_ratio = log_probs - ref_log_probs
        # d log pi(a) / d logits = onehot(a) - pi: the expectation over a ~ pi, exactly, per position
        score_term = probs * log_ratio - probs * (probs * log_ratio).sum(dim=-1, keepdim=True)
        expected = 0.7 * score_term * (mask / mask.sum()).unsqueeze(-1)
    torch.testing.assert_close(term_grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kl_penalty", ["exact", "loss"])
def test_both_trainers_train_with_the_exact_kl(make_trainer, word_tokenizer, tmp_path, kl_penalty):
    trpo = make_trainer(kl_penalty=kl_penalty, max_steps=2)
    config = PPOConfig(
        output_dir=str(tmp_path / "ppo"),
        max_steps=2,
        batch_size=8,
        max_new_tokens=6,
        lora_target_modules=["q_proj", "v_proj"],
        kl_penalty=kl_penalty,
    )
    # A dense reward (every word scored), so that the first batch carries a gradient whatever is sampled.
    ppo = PPOTrainer(config, build_tiny_lm(word_tokenizer), word_tokenizer, WordScoreReward(), TOY_PROMPTS)
    for trainer, accepted in ((trpo, "trpo/accepted"), (ppo, "ppo/kl")):
        rows = trainer.train()
        assert [r["step"] for r in rows] == [1, 2]
        assert rows[0]["kl/ref_exact"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: the policy is the reference
        assert rows[1]["kl/ref_exact"] > 0 and rows[1][accepted] > 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"kl_penalty": "sampled"}, "kl_penalty='sampled' is not one of"),
    ],
)
def test_bad_kl_penalties_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        TRPOConfig(**overrides)
