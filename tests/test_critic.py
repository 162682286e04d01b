"""The critic on the top layers: critic_layers puts the critic's adapter on the top decoder layers
only, its passes run from the hidden states the rollout's reference forward computed below them."""

import math

import pytest
import torch
from conftest import bitwise_equal, policy_snapshot

from trpo_rlhf import TRPOConfig
from trpo_rlhf.actor_critic import VALUE_ADAPTER, critic_adapter_layers
from trpo_rlhf.experiments.toy import build_tiny_lm

EVERY_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted_modules(actor_critic, adapter: str) -> set[tuple[int, str]]:
    """(decoder layer, module name) of every module the adapter adapts."""
    return {
        (int(name.split(".layers.")[1].split(".")[0]), name.split(".lora_A")[0].rsplit(".", 1)[-1])
        for name, _ in actor_critic.peft_model.named_parameters()
        if name.endswith(f"lora_A.{adapter}.weight")
    }


def value_adapter_layers(actor_critic) -> set[int]:
    return {layer for layer, _ in adapted_modules(actor_critic, VALUE_ADAPTER)}


def full_pass_values(actor_critic, batch) -> torch.Tensor:
    """V from a pass through every layer of the base with the value adapter on, computed here apart
    from `LoraActorCritic.values`."""
    backbone = actor_critic.peft_model.get_base_model().base_model
    inputs = batch.model_inputs()
    T = inputs.pop("response_length")
    with torch.no_grad(), actor_critic._adapter(VALUE_ADAPTER):
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return actor_critic.value_head(hidden[:, -T - 1 : -1])


def randomize_critic(actor_critic) -> None:
    """Random values in the critic adapter's B tensors (zero at init) and its head's weights."""
    with torch.no_grad():
        for name, p in actor_critic.peft_model.named_parameters():
            if f"lora_B.{VALUE_ADAPTER}." in name:
                p.normal_(std=0.5)
        actor_critic.value_head.summary.weight.normal_()


def test_critic_layers_adapt_the_top_layers_and_read_the_reference_pass(make_trainer):
    trainer = make_trainer(critic_layers=1)
    actor_critic = trainer.actor_critic
    assert value_adapter_layers(actor_critic) == {1}  # the tiny model has layers 0 and 1
    randomize_critic(actor_critic)  # an adapter and head that change the values, so that the check below can fail
    batch, _ = trainer.collect_batch()
    B, T = batch.response_mask.shape
    assert batch.features.shape == (B, batch.input_ids.shape[1], actor_critic.peft_model.config.hidden_size)
    assert not batch.features.requires_grad
    expected = full_pass_values(actor_critic, batch) * batch.response_mask
    torch.testing.assert_close(batch.values, expected, rtol=1e-5, atol=1e-5)
    assert batch.values.abs().sum() > 0
    with torch.no_grad():  # without cached features the critic runs a reference forward for them
        torch.testing.assert_close(actor_critic.values(**batch.model_inputs()) * batch.response_mask, expected)


def test_critic_layers_update_runs_only_the_top_layers(make_trainer, monkeypatch):
    trainer = make_trainer(critic_layers=1, value_epochs=20, value_lr=1e-2)
    batch, _ = trainer.collect_batch()
    batch.returns = torch.linspace(-1, 1, batch.returns.numel()).view_as(batch.returns) * batch.response_mask
    policy_before = policy_snapshot(trainer)
    critic_before = [p.detach().clone() for p in trainer.actor_critic.value_parameters()]
    lower_layer = trainer.actor_critic.peft_model.get_base_model().model.layers[0]

    def not_run(*args, **kwargs):
        raise AssertionError("the critic's update ran a layer below its critic_layers")

    monkeypatch.setattr(lower_layer, "forward", not_run)
    first = trainer.value_update(batch)
    later = trainer.value_update(batch)
    monkeypatch.undo()
    assert math.isfinite(first["value/loss"]) and later["value/loss"] < first["value/loss"]
    assert bitwise_equal(policy_before, policy_snapshot(trainer))
    moved = [p.detach() for p in trainer.actor_critic.value_parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(critic_before, moved)), "a critic tensor did not move"


def test_critic_layers_save_and_reload(make_trainer, tmp_path):
    trainer = make_trainer(critic_layers=1, max_steps=2, value_lr=1e-2)
    trainer.train()
    fresh = make_trainer(critic_layers=1, output_dir=str(tmp_path / "again"))
    fresh.load_value_function(tmp_path / "run")
    for a, b in zip(fresh.actor_critic.value_parameters(), trainer.actor_critic.value_parameters()):
        assert torch.equal(a, b)


def test_the_critic_adapts_its_own_modules_on_its_layers(make_trainer):
    trainer = make_trainer(critic_layers=1, critic_lora_target_modules=["q_proj", "up_proj"])
    assert adapted_modules(trainer.actor_critic, VALUE_ADAPTER) == {(1, "q_proj"), (1, "up_proj")}
    expected_policy = {(layer, module) for layer in (0, 1) for module in ("q_proj", "v_proj")}
    assert adapted_modules(trainer.actor_critic, "default") == expected_policy
    batch, _ = trainer.collect_batch()
    torch.testing.assert_close(
        batch.values, full_pass_values(trainer.actor_critic, batch) * batch.response_mask, rtol=1e-5, atol=1e-5
    )


def test_a_critic_module_the_model_lacks_is_named(make_trainer):
    with pytest.raises(
        ValueError, match=r"critic_lora_target_modules=\['q_proj', 'c_attn'\]: \['c_attn'\] match no module"
    ):
        make_trainer(critic_lora_target_modules=["q_proj", "c_attn"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"critic_lora_target_modules": ["q_proj", ""]},
            r"critic_lora_target_modules=\['q_proj', ''\] holds an empty name",
        ),
        ({"critic_layers": 0}, r"critic_layers=0 must be >= 1"),
        ({"critic_layer_fraction": 0.0}, r"critic_layer_fraction=0.0 must be in \(0, 1\]"),
        ({"critic_layer_fraction": 1.5}, r"critic_layer_fraction=1.5 must be in \(0, 1\]"),
    ],
)
def test_bad_critic_layers_are_refused_by_the_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        TRPOConfig(**overrides)


def test_more_critic_layers_than_the_model_has_are_refused(make_trainer):
    with pytest.raises(ValueError, match=r"critic_layers=3: LlamaModel has 2 decoder layers; pass at most 2"):
        make_trainer(critic_layers=3)


def test_a_backbone_that_re_embeds_its_input_is_refused(make_trainer, word_tokenizer):
    """GPT-2 adds position embeddings to `inputs_embeds`, so its top layers cannot be entered with
    hidden states: the build-time check refuses an explicit critic_layers rather than training a wrong critic."""
    with pytest.raises(ValueError, match=r"critic_layers=1: GPT2Model does not reproduce its full pass"):
        make_trainer(model=tiny_gpt2(word_tokenizer), lora_target_modules=None, critic_layers=1)


def tiny_gpt2(word_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=len(word_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ).eval()


def test_the_default_critic_adapts_every_linear_module_of_the_top_layers(make_trainer):
    """critic_layer_fraction 0.4 of the tiny model's 2 layers rounds to its top one; every linear
    module there but the LM head, whatever the policy adapts; its passes read the reference forward."""
    trainer = make_trainer()
    assert trainer.config.critic_layers is None and trainer.actor_critic.critic_layers == 1
    assert trainer.actor_critic.critic_reads_reference
    assert adapted_modules(trainer.actor_critic, VALUE_ADAPTER) == {(1, module) for module in EVERY_LINEAR}
    assert adapted_modules(trainer.actor_critic, "default") == {
        (layer, m) for layer in (0, 1) for m in ("q_proj", "v_proj")
    }
    batch, _ = trainer.collect_batch()
    torch.testing.assert_close(
        batch.values, full_pass_values(trainer.actor_critic, batch) * batch.response_mask, rtol=1e-5, atol=1e-5
    )
    spanning = make_trainer(critic_layer_fraction=1.0, critic_lora_target_modules=["all-linear"])
    assert not spanning.actor_critic.critic_reads_reference
    assert adapted_modules(spanning.actor_critic, VALUE_ADAPTER) == {
        (layer, m) for layer in (0, 1) for m in EVERY_LINEAR
    }


@pytest.mark.parametrize(
    "layers, fraction, top", [(30, 0.4, 12), (12, 0.4, 5), (32, 0.4, 13), (4, 0.1, 1), (4, 1.0, None)]
)
def test_the_fraction_takes_the_rounded_top_share_of_the_layers(word_tokenizer, layers, fraction, top):
    model = build_tiny_lm(word_tokenizer)
    model.model.layers = torch.nn.ModuleList([model.model.layers[0]] * layers)
    placement = critic_adapter_layers(model.model, TRPOConfig(critic_layer_fraction=fraction))
    assert placement == (None if top is None else ("layers", list(range(layers - top, layers))))


def test_gpt2_keeps_the_top_layer_critic_and_runs_every_layer(make_trainer, word_tokenizer):
    """Under the fraction a backbone that re-embeds its input (GPT-2) keeps the adapter on its top
    layers; its passes run every layer, and the values are still those of the full pass."""
    trainer = make_trainer(model=tiny_gpt2(word_tokenizer), lora_target_modules=None)
    actor_critic = trainer.actor_critic
    assert not actor_critic.critic_reads_reference
    names = [n for n, _ in actor_critic.peft_model.named_parameters() if f"lora_A.{VALUE_ADAPTER}." in n]
    assert names and all(".h.1." in n for n in names)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    randomize_critic(actor_critic)
    batch, _ = trainer.collect_batch()
    expected = full_pass_values(actor_critic, batch)
    torch.testing.assert_close(batch.values, expected * batch.response_mask, rtol=1e-5, atol=1e-5)
    assert batch.values.abs().sum() > 0


def test_a_critic_saved_on_other_layers_is_refused(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=1)
    trainer.train()
    spanning = make_trainer(critic_layer_fraction=1.0, output_dir=str(tmp_path / "again"))
    with pytest.raises(ValueError, match=r"holds a critic adapter on other layers or modules .* critic_layer_fraction"):
        spanning.load_value_function(tmp_path / "run")
