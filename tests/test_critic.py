"""critic="policy_features": a value head on the policy's detached hidden states, read from the
policy's rollout forward and trained on those cached features without any model pass."""

import math

import pytest
import torch
from conftest import bitwise_equal, policy_snapshot

from trpo_rlhf import TRPOConfig
from trpo_rlhf.actor_critic import VALUE_ADAPTER


def test_the_critic_reads_the_policy_forward_and_has_no_adapter(make_trainer):
    trainer = make_trainer(critic="policy_features")
    actor_critic = trainer.actor_critic
    assert VALUE_ADAPTER not in actor_critic.peft_model.peft_config
    assert {id(p) for p in actor_critic.value_parameters()} == {id(p) for p in actor_critic.value_head.parameters()}
    with torch.no_grad():  # a head that predicts something, so the values below are not all zero
        actor_critic.value_head.summary.weight.normal_()
    batch, _ = trainer.collect_batch()
    B, T = batch.response_mask.shape
    assert batch.features.shape == (B, T, trainer.actor_critic.peft_model.config.hidden_size)
    assert not batch.features.requires_grad
    with torch.no_grad():
        logits, features = actor_critic.policy_logits_and_features(**batch.model_inputs())
        expected_values = actor_critic.value_head(features) * batch.response_mask
    torch.testing.assert_close(logits, trainer.policy_logits(batch))  # the same policy forward
    torch.testing.assert_close(batch.features, features)
    torch.testing.assert_close(batch.values, expected_values)
    assert batch.values.abs().sum() > 0


def test_its_update_trains_the_head_alone_with_no_model_pass(make_trainer, monkeypatch):
    trainer = make_trainer(critic="policy_features", value_epochs=30, value_lr=1e-2)
    batch, _ = trainer.collect_batch()
    batch.returns = torch.linspace(-1, 1, batch.returns.numel()).view_as(batch.returns) * batch.response_mask
    policy_before = policy_snapshot(trainer)
    head_before = [p.detach().clone() for p in trainer.actor_critic.value_head.parameters()]

    def no_model_pass(*args, **kwargs):
        raise AssertionError("the policy_features critic's update ran a model pass")

    monkeypatch.setattr(trainer.actor_critic.peft_model, "forward", no_model_pass)
    first = trainer.value_update(batch)
    later = trainer.value_update(batch)
    monkeypatch.undo()
    assert math.isfinite(first["value/loss"]) and later["value/loss"] < first["value/loss"]
    assert bitwise_equal(policy_before, policy_snapshot(trainer))
    assert not bitwise_equal(head_before, [p.detach() for p in trainer.actor_critic.value_head.parameters()])


def test_it_saves_reloads_and_refuses_the_other_kind(make_trainer, tmp_path):
    trainer = make_trainer(critic="policy_features", max_steps=2, value_lr=1e-2)
    trainer.train()
    out = tmp_path / "run"
    assert (out / "value" / "value_head.safetensors").exists()
    assert not (out / "value" / VALUE_ADAPTER).exists()
    fresh = make_trainer(critic="policy_features", output_dir=str(tmp_path / "again"))
    fresh.load_value_function(out)
    for a, b in zip(fresh.actor_critic.value_head.parameters(), trainer.actor_critic.value_head.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="critic='policy_features' critic, this model has critic='adapter'"):
        make_trainer(output_dir=str(tmp_path / "other")).load_value_function(out)


def test_an_unknown_critic_is_refused():
    with pytest.raises(ValueError, match=r"critic='value_head' is not one of \('adapter', 'policy_features'\)"):
        TRPOConfig(critic="value_head")
