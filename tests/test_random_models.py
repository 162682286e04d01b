"""random:<shape> models for cost measurements at scale, and model_dtype (the frozen base's dtype)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments import task_for_model
from trpo_rlhf.experiments.random_models import random_model_config


@pytest.mark.parametrize("shape, parameters", [("135m", 134_515_008), ("1.7b", 1_711_376_384), ("8b", 8_030_261_248)])
def test_the_presets_have_the_published_parameter_counts(shape, parameters):
    with torch.device("meta"):  # shapes only: no memory
        model = AutoModelForCausalLM.from_config(random_model_config(shape))
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.fixture
def small_config(tmp_path):
    path = tmp_path / "config.json"
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    path.write_text(json.dumps(dict(model_type="llama", num_key_value_heads=2, vocab_size=49152, **shape)))
    return path


def test_a_config_file_builds_a_random_model_in_the_asked_dtype_that_trpo_trains(small_config, tmp_path):
    task = task_for_model(f"random:{small_config}", seed=0, dtype=torch.bfloat16)
    assert task.model.config.hidden_size == 32 and task.model.config.num_hidden_layers == 2
    assert {p.dtype for p in task.model.parameters()} == {torch.bfloat16}
    assert task.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert len(task.tokenizer) == 49152  # the embedded SmolLM2 tokenizer, a real BPE one
    config = TRPOConfig(
        output_dir=str(tmp_path / "run"),
        batch_size=4,
        max_new_tokens=4,
        max_steps=1,
        model_dtype="bfloat16",
        lora_target_modules=task.lora_target_modules,
        max_kl=0.05,
        cg_iters=2,  # the dtypes, not the solve, are under test: two products over the 49,152-token head,
        fisher_chunks=1,  # on one graph of the batch
    )
    trainer = TRPOTrainer(config, task.model, task.tokenizer, task.reward_model, task.prompts)
    kinds = {
        ("lora" if "lora_" in n else "base", p.dtype) for n, p in trainer.actor_critic.peft_model.named_parameters()
    }
    assert kinds == {("lora", torch.float32), ("base", torch.bfloat16)}
    assert {p.dtype for p in trainer.actor_critic.value_head.parameters()} == {torch.float32}
    batch, _ = trainer.collect_batch()
    assert trainer.policy_logits(batch).dtype == torch.float32
    stats = trainer.policy_update(batch)
    assert stats["trpo/accepted"] == 1 and 0 < stats["trpo/kl"] <= 1.5 * config.max_kl


def test_model_dtype_casts_a_given_model_and_loads_a_named_one(tiny_lm, word_tokenizer, tmp_path):
    from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward

    tiny_lm.save_pretrained(tmp_path / "saved")
    word_tokenizer.save_pretrained(tmp_path / "saved")
    for model in (tiny_lm, str(tmp_path / "saved")):
        config = TRPOConfig(output_dir=str(tmp_path / "run"), model_dtype="float16", overwrite_output_dir=True)
        trainer = TRPOTrainer(config, model, word_tokenizer, WordScoreReward(), TOY_PROMPTS)
        base = [p for n, p in trainer.actor_critic.peft_model.named_parameters() if "lora_" not in n]
        assert {p.dtype for p in base} == {torch.float16}
        assert {p.dtype for p in trainer.actor_critic.policy_parameters()} == {torch.float32}


def test_unknown_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match=r"random:9b: not one of the shapes \['1.7b', '135m', '8b'\]"):
        random_model_config("9b")
    with pytest.raises(ValueError, match="model_dtype='fp8' is not one of"):
        TRPOConfig(model_dtype="fp8")
