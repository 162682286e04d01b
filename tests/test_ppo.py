import pytest
import torch
from conftest import bitwise_equal, policy_snapshot, toy_eval_reward

from trpo_rlhf import PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordCountReward, WordScoreReward, build_tiny_lm
from trpo_rlhf.ppo import clipped_surrogate_loss
from trpo_rlhf.rollout import token_logprobs

SHARED = dict(
    max_steps=3,
    batch_size=8,
    max_new_tokens=6,
    seed=0,
    lora_target_modules=["q_proj", "v_proj", "lm_head"],
    value_epochs=1,
    value_minibatch_size=4,
)


def make_ppo(tmp_path, tokenizer, reward_fn=None, **overrides):
    config = PPOConfig(output_dir=str(tmp_path / "ppo"), **(SHARED | overrides))
    return PPOTrainer(
        config=config,
        model=build_tiny_lm(tokenizer),
        tokenizer=tokenizer,
        reward_fn=reward_fn or WordScoreReward(),
        train_dataset=TOY_PROMPTS,
    )


def test_clipped_surrogate_by_hand():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clip_fraction = clipped_surrogate_loss(logp, logp_old, advantages, torch.ones(1, 3), 0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(0.5, 0.8) = 0.5; token 2: min(-1.1, -1.1) = -1.1
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)


def test_ppo_and_trpo_share_the_engine_and_see_identical_first_rollouts(tmp_path, word_tokenizer):
    seen = {}

    def recorder(name):
        def reward(prompts, completions):
            seen.setdefault(name, (list(prompts), list(completions)))
            return WordScoreReward()(prompts, completions)

        return reward

    # Sampling draws on torch's global RNG, which each trainer seeds when it is built.
    ppo = make_ppo(tmp_path, word_tokenizer, reward_fn=recorder("ppo"))
    ppo_stats = ppo.step()
    trpo = TRPOTrainer(
        config=TRPOConfig(output_dir=str(tmp_path / "trpo"), **SHARED),
        model=build_tiny_lm(word_tokenizer),
        tokenizer=word_tokenizer,
        reward_fn=recorder("trpo"),
        train_dataset=TOY_PROMPTS,
    )
    trpo_stats = trpo.step()
    assert seen["ppo"] == seen["trpo"]
    for key in ("reward/mean", "kl/ref", "policy/entropy", "value/explained_variance"):
        assert ppo_stats[key] == pytest.approx(trpo_stats[key]), key
    assert type(ppo).value_update is type(trpo).value_update  # one critic update, not a copy
    assert type(ppo)._advantages is type(trpo)._advantages


def test_ppo_metrics_and_critic_isolation(tmp_path, word_tokenizer):
    trainer = make_ppo(tmp_path, word_tokenizer)
    value_before = [p.detach().clone() for p in trainer.actor_critic.value_parameters()]
    policy_before = policy_snapshot(trainer)
    trainer.config.value_epochs = 0  # isolate the policy update
    stats = trainer.step()
    for key in (
        "ppo/kl",
        "ppo/surrogate_gain",
        "ppo/clipfrac",
        "ppo/epochs_run",
        "reward/mean",
        "kl/ref",
        "kl/coef",
        "value/loss",
        "policy/entropy",
        "time/policy_update",
        "memory/peak_mb",
    ):
        assert key in stats, key
    assert stats["ppo/kl"] > 0 and 0 <= stats["ppo/clipfrac"] <= 1 and stats["ppo/epochs_run"] == 4
    assert not bitwise_equal(policy_before, policy_snapshot(trainer))
    assert bitwise_equal(value_before, [p.detach() for p in trainer.actor_critic.value_parameters()])


def test_ppo_surrogate_gain_is_trpos_surrogate_measured_by_hand(tmp_path, word_tokenizer):
    """`ppo/surrogate_gain` is L(theta_new) - L(theta_old) of TRPO's surrogate on the batch, so the
    benchmark can set the two updates' gains side by side."""
    trainer = make_ppo(tmp_path, word_tokenizer, learning_rate=1e-2)
    batch, _ = trainer.collect_batch()

    def surrogate_now() -> float:
        with torch.no_grad():
            logp = token_logprobs(trainer.policy_logits(batch), batch.response_ids)
        ratio_times_advantage = torch.exp(logp - batch.logp_old) * batch.advantages
        return ((ratio_times_advantage * batch.response_mask).sum() / batch.response_mask.sum()).item()

    before = surrogate_now()
    stats = trainer.policy_update(batch)
    gain = surrogate_now() - before
    assert abs(gain) > 1e-4  # the policy moved
    assert stats["ppo/surrogate_gain"] == pytest.approx(gain, rel=1e-4, abs=1e-7)


def test_target_kl_stops_the_epochs_early(tmp_path, word_tokenizer):
    trainer = make_ppo(tmp_path, word_tokenizer, target_kl=1e-9, learning_rate=1e-2)
    stats = trainer.step()
    assert stats["ppo/epochs_run"] == 1 and stats["ppo/kl"] > 1e-9


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"clip_range": 0.0}, "clip_range=0.0"),
        ({"ppo_epochs": 0}, "ppo_epochs=0"),
        ({"num_minibatches": 99}, "num_minibatches=99"),
    ],
)
def test_invalid_ppo_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**overrides)


def test_ppo_learns_the_toy_task(tmp_path, word_tokenizer):
    # TRL's default rate (5e-5) is a full-model rate; LoRA tensors of a tiny random model need ~1e-3.
    trainer = make_ppo(
        tmp_path,
        word_tokenizer,
        reward_fn=WordCountReward("good"),
        max_steps=30,
        batch_size=16,
        max_new_tokens=8,
        value_epochs=4,
        learning_rate=1e-3,
    )
    before = toy_eval_reward(trainer)
    trainer.train()
    after = toy_eval_reward(trainer)
    assert after > before + 0.5, (before, after)
