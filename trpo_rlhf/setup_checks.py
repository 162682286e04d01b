"""The checks `engine.RLTrainer` runs at construction, before anything is loaded or computed:
each bad input fails there with an error naming the value and the fix."""

from __future__ import annotations

from collections.abc import Mapping

from accelerate.utils import DistributedType
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .actor_critic import base_model_of
from .loading import (
    context_length,
)
from .prompts import chat_prompt_text, is_conversational, prompt_columns
from .sharding import deepspeed_zero_stage, fsdp_requested


class SetupChecks:
    """Construction-time checks of `engine.RLTrainer`'s inputs (the launch, output_dir, vocabulary,
    prompts); they read the trainer's config, tokenizer and accelerator."""

    def _check_distributed_type(self) -> None:
        # The trainer averages g, Fisher quadratics and products, line-search measurements and
        # critic gradients itself, and shards the frozen base with FSDP2 (`sharding`) for fsdp.yaml
        # and DeepSpeed ZeRO-3 alike; it never goes through accelerate's prepare.
        kind = self.accelerator.distributed_type
        if kind == DistributedType.MEGATRON_LM:
            raise ValueError(
                f"accelerate's distributed_type is {kind.value}: this trainer does not run under it. Launch with "
                "recipes/accelerate_configs/fsdp.yaml or deepspeed_zero3.yaml (the frozen base sharded) or "
                "multi_gpu.yaml (one replica per GPU)."
            )
        self.sharded = fsdp_requested(kind) or deepspeed_zero_stage(kind) == 3
        if self.sharded and self.config.compile_generation:
            raise ValueError(
                "compile_generation=True with the frozen base sharded (fsdp.yaml, deepspeed_zero3.yaml): the compiled "
                "decode step would gather the sharded layers inside its graph, which this trainer does not support. "
                "Leave --compile_generation off, or launch with multi_gpu.yaml (one replica per GPU)."
            )
        if self.sharded:
            self._check_shardable()

    def _check_vocabulary(self, model) -> None:
        embedding = base_model_of(model).get_input_embeddings()
        rows = getattr(embedding, "num_embeddings", None)
        if rows is not None and len(self.tokenizer) > rows:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the model's embedding has {rows} rows, so token ids >= {rows} "
                "would index past it. Pass the tokenizer the model was trained with, or resize the model first: "
                "model.resize_token_embeddings(len(tokenizer))."
            )

    @staticmethod
    def _tokenizer_for(model) -> PreTrainedTokenizerBase:
        base = base_model_of(model)
        name = getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "")
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as exc:
            raise ValueError(
                f"No tokenizer was given and none could be loaded for the model ({name!r}): pass tokenizer=... "
                "(the tokenizer the model was trained with)."
            ) from exc

    def _validate_prompts(self, train_dataset, model) -> list[str]:
        """The prompts' texts, as the policy reads them; sets `prompt_messages` (a conversational
        dataset's messages, else None) and `prompt_columns` (the dataset's other columns)."""
        if isinstance(train_dataset, Mapping):
            # A dict of columns, as datasets.Dataset.from_dict takes it (iterating it would yield its keys).
            from datasets import Dataset

            try:
                train_dataset = Dataset.from_dict(dict(train_dataset))
            except Exception as exc:
                raise TypeError(
                    f"train_dataset is a {type(train_dataset).__name__} with keys {list(train_dataset)[:4]}: a mapping is "
                    "read as a dataset's columns, e.g. {'prompt': ['This movie', ...]}, each a list of one length "
                    f"({exc})."
                ) from exc
        prompts, self.prompt_columns = prompt_columns(train_dataset)
        if not prompts:
            raise ValueError(
                "train_dataset is empty: pass at least one prompt (a list of strings or a Dataset with a 'prompt' column)."
            )
        self.prompt_messages = None
        if is_conversational(prompts[0]):
            self.prompt_messages = prompts
            prompts = [chat_prompt_text(self.tokenizer, m, f"train_dataset prompt {i}") for i, m in enumerate(prompts)]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=self.add_special_tokens)["input_ids"]]
        self.longest_prompt_tokens = max(lengths)
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(
                f"Prompt {empty[0]} ({prompts[empty[0]]!r}) tokenizes to nothing; remove empty prompts from train_dataset."
            )
        unknown = self._unknown_only_prompts(prompts)
        if unknown:
            raise ValueError(
                f"Prompt {unknown[0]} ({prompts[unknown[0]]!r}) tokenizes to unknown tokens only "
                f"({self.tokenizer.unk_token!r}; {len(unknown)} prompts do): the model would see nothing of it. Pass the "
                "tokenizer the model was trained with, or remove those prompts."
            )
        limit = context_length(base_model_of(model))
        if limit is not None:
            too_long = [i for i, n in enumerate(lengths) if n + self.config.max_new_tokens > limit]
            if too_long:
                i = too_long[0]
                raise ValueError(
                    f"Prompt {i} is {lengths[i]} tokens; with max_new_tokens={self.config.max_new_tokens} that exceeds the "
                    f"model's context of {limit} tokens ({len(too_long)} prompts do). Shorten or drop those prompts, "
                    "or lower --max_new_tokens."
                )
        return prompts

    @property
    def add_special_tokens(self) -> bool:
        """Whether the prompts' texts are tokenized with the tokenizer's special tokens added: not for
        chat prompts, whose template already holds them (as `apply_chat_template` tokenizes)."""
        return self.prompt_messages is None

    def _unknown_only_prompts(self, prompts: list[str]) -> list[int]:
        """The prompts whose tokens, special ones aside, are all the unknown token."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        special = set(self.tokenizer.all_special_ids) - {unk}
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [i for i, row in enumerate(ids) if unk in row and all(t == unk or t in special for t in row)]

    def _check_held_out_prompts(self) -> None:
        world, count = self.accelerator.num_processes, self.config.held_out_kl_prompts
        batch_prompts = self.config.batch_size // self.config.num_generations
        needed = world * (batch_prompts + count)
        if count and len(self.prompts) < needed:
            raise ValueError(
                f"held_out_kl_prompts={count} holds out {world * count} prompts beside each step's batch of "
                f"{world * batch_prompts}: train_dataset has {len(self.prompts)} prompts, {needed} are needed. "
                "Pass more prompts, or lower --held_out_kl_prompts (0: off)."
            )
