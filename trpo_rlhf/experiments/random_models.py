"""Randomly initialised causal LMs of a published shape, for timing and memory at scale without
downloading weights: `--model random:8b` in the benchmark. A random model's completions are
gibberish, so these measure cost, never learning.

    >>> from trpo_rlhf.experiments.random_models import random_model_config
    >>> random_model_config("8b").num_hidden_layers
    32
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

RANDOM_PREFIX = "random:"
# Llama-architecture shapes: SmolLM2-135M and SmolLM2-1.7B (Allal et al. 2025), Llama-3-8B (Grattafiori et al. 2024).
RANDOM_SHAPES = {
    "135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=130000.0,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}
# LoRA on every attention projection, as the scale targets ask.
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def random_model_config(spec: str):
    """The config `random:<spec>` names: a preset of RANDOM_SHAPES, or a path to a config.json."""
    if spec in RANDOM_SHAPES:
        return LlamaConfig(max_position_embeddings=8192, **RANDOM_SHAPES[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return AutoConfig.for_model(**json.loads(path.read_text()))
    raise ValueError(
        f"{RANDOM_PREFIX}{spec}: not one of the shapes {sorted(RANDOM_SHAPES)} nor a config.json file or a folder "
        f"holding one (e.g. {RANDOM_PREFIX}8b or {RANDOM_PREFIX}path/to/config.json)."
    )


def build_random_lm(
    spec: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised causal LM of the shape `spec` names, its weights created directly in
    `dtype` (an 8B model never exists in float32), on the GPU when there is one, with the embedded
    SmolLM2 tokenizer (a real BPE tokenizer; its 49152 tokens fit every preset's vocabulary)."""
    from transformers import AutoTokenizer

    from ..loading import embedded_model_path

    config = random_model_config(spec)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"{RANDOM_PREFIX}{spec}: vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens."
        )
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
