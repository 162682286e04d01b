"""The LoRA actor-critic. One frozen base model serves three roles:

* the policy: base + the policy LoRA adapter (the only tensors TRPO moves),
* the reference: base with adapters disabled (no second copy of the weights),
* the critic: base + a second LoRA adapter named ``"value"`` + a scalar head. The critic's adapter sits on the top decoder layers only (``critic_layer_fraction`` of them, or
  ``critic_layers`` N) and adapts every linear module there; below them the critic is the frozen
  base, the reference's own, so its passes start from the hidden states the rollout's reference
  forward already computed there and run N layers, not all of them.

`double_backward_attention` runs the policy's attention on a path that allows the second backward
the Fisher-vector products need.

    >>> from trpo_rlhf.actor_critic import LoraActorCritic    # doctest: +SKIP
    >>> actor_critic = LoraActorCritic.build(model, TRPOConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import shutil
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from .sharding import decoder_layers

VALUE_ADAPTER = "value"
# Every linear (and GPT-2 Conv1D) module of the decoder layers, as PEFT's shorthand names it.
ALL_LINEAR = "all-linear"


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------------------------
# Attention for the double backward
# --------------------------------------------------------------------------------------------
# The model inside `double_backward_attention`, if any: a checkpointed layer's recomputation in the
# backward (outside that context) must run the attention its forward ran.
_DOUBLE_BACKWARD_MODEL: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar(
    "double_backward_model", default=None
)


@contextlib.contextmanager
def double_backward_attention(model: nn.Module) -> Iterator[None]:
    """Run attention through a path that supports a second backward.

    Fused SDPA kernels (flash/efficient on GPU, the flash kernel on CPU) and FlashAttention have no
    double backward, but the Fisher-vector product differentiates a gradient. Inside
    this context SDPA is restricted to its MATH backend, and any other non-eager implementation is
    switched to SDPA (math) and back on exit. Outside it, generation and single-backward passes keep
    the fast kernels.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    base = base_model_of(model)
    original = getattr(base.config, "_attn_implementation", "eager")
    switched = original not in ("eager", "sdpa")
    if switched:
        base.set_attn_implementation("sdpa")
    token = _DOUBLE_BACKWARD_MODEL.set(model)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _DOUBLE_BACKWARD_MODEL.reset(token)
        if switched:
            base.set_attn_implementation(original)


# --------------------------------------------------------------------------------------------
# LoRA actor-critic
# --------------------------------------------------------------------------------------------
def lora_config_from(config, target_modules: list[str] | None = None, layers: tuple[str, list[int]] | None = None):
    """The LoRA config of an adapter; `layers` = (the layer list's name, indices) restricts it to those
    decoder layers."""
    from peft import LoraConfig

    layers_pattern, layers_to_transform = layers if layers is not None else (None, None)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules if target_modules is not None else config.lora_target_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        bias="none",
        task_type="CAUSAL_LM",
    )


def layer_stack(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """The attribute name and the ModuleList of `backbone`'s decoder layers (its child list of the
    classes transformers names in `_no_split_modules`, e.g. ("layers", LlamaModel.layers))."""
    layers = {id(layer) for layer in decoder_layers(backbone)}
    for name, child in backbone.named_children():
        if isinstance(child, nn.ModuleList) and len(child) and all(id(layer) in layers for layer in child):
            return name, child
    raise ValueError(
        f"critic_layers: {type(backbone).__name__} has no child list of decoder layers (`_no_split_modules` "
        f"classes) to take the top layers of; leave critic_layers unset (the critic adapts every layer)."
    )


class _ReenterableContext:
    """A context manager made anew by `make` at each entry: a checkpoint enters its recomputation
    context once for every backward through the layer (twice where a gradient is differentiated)."""

    def __init__(self, make):
        self.make = make
        self.entered = []

    def __enter__(self):
        context = self.make()
        self.entered.append(context)
        return context.__enter__()

    def __exit__(self, *exc):
        return self.entered.pop().__exit__(*exc)


def checkpoint_decoder_layers(model: nn.Module, enabled: bool = True) -> int:
    """Make each decoder layer of `model` (`decoder_layers`; the outer one of nested layers) keep only
    its inputs in a graph and recompute its activations in the backward; passes without a graph run
    as before. `enabled=False` undoes it. Returns the number of (outer) decoder layers.

        >>> checkpoint_decoder_layers(model)  # doctest: +SKIP
        30
    """
    layers = decoder_layers(model)
    if not layers and enabled:
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} names no decoder layer classes (`_no_split_modules`) "
            "whose activations could be recomputed; leave gradient_checkpointing off."
        )
    nested = {id(inner) for layer in layers for inner in layer.modules() if inner is not layer}
    outer = [layer for layer in layers if id(layer) not in nested]
    for layer in outer:
        if enabled:
            layer.forward = types.MethodType(_checkpointed_forward, layer)
        elif getattr(layer.__dict__.get("forward"), "__func__", None) is _checkpointed_forward:
            del layer.forward
    return len(outer)


def _checkpointed_forward(layer: nn.Module, *args, **kwargs):
    # The checkpoint wraps `forward`, not `__call__`, as transformers' own does: module hooks (FSDP2's
    # gathers) stay outside the recomputation. The class's forward is looked up at each call, so the
    # class FSDP2 swaps in runs. Non-reentrant checkpointing also serves the double backward of the
    # Fisher-vector products (its recomputation under the forward's double-backward attention, which
    # the fused kernels' saved tensors would not match), and replays the forward's random state (LoRA
    # dropout in the critic).
    forward = functools.partial(type(layer).forward, layer)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    model = _DOUBLE_BACKWARD_MODEL.get()

    def forward_and_recompute_contexts():
        recompute = (
            contextlib.nullcontext() if model is None else _ReenterableContext(lambda: double_backward_attention(model))
        )
        return contextlib.nullcontext(), recompute

    return torch.utils.checkpoint.checkpoint(
        forward, *args, use_reentrant=False, context_fn=forward_and_recompute_contexts, **kwargs
    )


def critic_adapter_layers(backbone: nn.Module, config) -> tuple[str, list[int]] | None:
    """(the layer list's name, indices) of the top decoder layers the critic's adapter sits on:
    `config.critic_layers` of them, else `round(critic_layer_fraction * n)` (at least one); None
    for every layer (a fraction of 1, or a backbone with no layer list under a fraction)."""
    count = getattr(config, "critic_layers", None)
    fraction = getattr(config, "critic_layer_fraction", 1.0)
    if count is None and fraction >= 1.0:
        return None
    try:
        name, stack = layer_stack(backbone)
    except ValueError:
        if count is not None:
            raise
        warnings.warn(
            f"critic_layer_fraction={fraction}: {type(backbone).__name__} has no list of decoder layers to take the "
            "top ones of, so the critic's adapter spans every layer (set critic_layer_fraction=1.0 to silence this).",
            stacklevel=3,
        )
        return None
    if count is None:
        count = max(1, round(fraction * len(stack)))
    if count > len(stack):
        raise ValueError(
            f"critic_layers={count}: {type(backbone).__name__} has {len(stack)} decoder layers; "
            f"pass at most {len(stack)}, e.g. --critic_layers {max(1, len(stack) // 5)}."
        )
    return name, list(range(len(stack) - count, len(stack)))


def linear_module_names(modules: list[nn.Module]) -> list[str]:
    """The names (last dotted part) of the linear and GPT-2 Conv1D modules in `modules`; a module
    PEFT already wraps counts by its own name, not its inner layers'."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = set()
    for root in modules:
        wrapped: list[str] = []
        for path, module in root.named_modules():
            if not path or any(path.startswith(f"{w}.") for w in wrapped):
                continue
            if isinstance(module, BaseTunerLayer):
                wrapped.append(path)
            if isinstance(module, (nn.Linear, BaseTunerLayer)) or type(module).__name__ == "Conv1D":
                names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def unmatched_target_modules(model: nn.Module, targets: list[str] | str | None) -> list[str]:
    """The names in `targets` that match no module of `model` (PEFT matches a name to a module whose
    dotted path is that name or ends with it). A regex string or None (PEFT's default) is not checked."""
    if targets is None or isinstance(targets, str):
        return []
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def _add_lora(
    model,
    config,
    adapter_name: str,
    layers: tuple[str, list[int]] | None = None,
    targets_field: str = "lora_target_modules",
    unset_targets: list[str] | str | None = None,
):
    """Wrap `model` (or extend a PeftModel) with a LoRA adapter on the modules named by the config
    field `targets_field` (`unset_targets` when it is None; on the `layers` of `lora_config_from` only,
    when given), turning PEFT's terse error about missing target modules into one that lists the
    modules the model has."""
    from peft import PeftModel, get_peft_model

    targets = getattr(config, targets_field)
    if targets is None:
        targets = unset_targets
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if targets in (ALL_LINEAR, [ALL_LINEAR]):
        # Named here rather than through PEFT's shorthand, which it refuses beside layers_to_transform.
        targets = linear_module_names(decoder_layers(base)) or ALL_LINEAR
    lora = lora_config_from(config, target_modules=targets, layers=layers)
    unmatched = unmatched_target_modules(base, targets)
    if unmatched:
        # PEFT adapts the names that match and ignores the rest: a typo would silently shrink the adapter.
        raise ValueError(
            f"{targets_field}={targets}: {unmatched} match no module of {type(base).__name__}. "
            f"Its linear layers are named {linear_module_names([base])}; pass some of them, e.g. --{targets_field} q_proj v_proj."
        )
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, lora)
            return model
        return get_peft_model(model, lora, adapter_name=adapter_name)
    except ValueError as exc:
        if "not found" not in str(exc) and "target_modules" not in str(exc):
            raise
        raise ValueError(
            f"{targets_field}={targets} matches no module of {type(base).__name__}. "
            f"Its linear layers are named {linear_module_names([base])}; pass some of them, e.g. "
            f"--{targets_field} q_proj v_proj, or leave it unset for PEFT's default. ({exc})"
        ) from exc


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the critic's last hidden state; zero-initialised so V = 0 at start."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


class LoraActorCritic(nn.Module):
    """Policy, reference and critic on one frozen base model.

    Build it from a plain model (a policy adapter is added from the config) or from a PeftModel
    (its active adapter is the policy, used as given); a LoRA adapter
    named "value" is added for the critic either way.

        >>> actor_critic = LoraActorCritic.build(model, config)     # doctest: +SKIP
        >>> logits = actor_critic.policy_logits(input_ids, attention_mask, position_ids, response_length=T)  # doctest: +SKIP
    """

    def __init__(
        self,
        peft_model: nn.Module,
        policy_adapter: str,
        value_head: ValueHead | None,
        autocast_dtype: torch.dtype | None = None,
        critic_layers: int | None = None,
        layer_list: str | None = None,
    ):
        super().__init__()
        self.peft_model = peft_model
        self.policy_adapter = policy_adapter
        self.value_head = value_head
        self.autocast_dtype = autocast_dtype
        self.critic_layers = critic_layers
        # The backbone's attribute holding its decoder layers (`layer_stack`), found once at build,
        # before any sharding: the critic's passes run a slice of it.
        self.layer_list = layer_list
        self.peft_model.eval()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to `autocast_dtype` for the model's forwards (no-op when None). Callers cast the
        outputs to float32 before any softmax, so the trust-region arithmetic stays float32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.peft_model.parameters()).device.type, dtype=self.autocast_dtype)

    @classmethod
    def build(cls, model: nn.Module, config) -> LoraActorCritic:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            policy_adapter = model.active_adapter
            if isinstance(policy_adapter, list):
                policy_adapter = policy_adapter[0]
            if VALUE_ADAPTER == policy_adapter:
                raise ValueError(
                    f"The PeftModel's active adapter is named '{VALUE_ADAPTER}', the name reserved for the critic; rename it."
                )
            peft_model = model
        else:
            policy_adapter = "default"
            peft_model = _add_lora(model, config, policy_adapter)
        for param in peft_model.get_base_model().parameters():
            param.requires_grad_(False)
        checkpoint_decoder_layers(peft_model.get_base_model(), getattr(config, "gradient_checkpointing", False))
        autocast_dtype = torch.bfloat16 if getattr(config, "bf16", False) else None
        if getattr(config, "advantage_estimator", "gae") != "gae":  # a group baseline: no critic at all
            peft_model.set_adapter(policy_adapter)
            return cls(peft_model, policy_adapter, None, autocast_dtype)
        layers = critic_adapter_layers(peft_model.get_base_model().base_model, config)
        if VALUE_ADAPTER not in peft_model.peft_config:
            _add_lora(peft_model, config, VALUE_ADAPTER, layers, "critic_lora_target_modules", ALL_LINEAR)
        peft_model.set_adapter(policy_adapter)
        hidden_size = peft_model.get_base_model().config.get_text_config().hidden_size
        head = ValueHead(hidden_size).to(next(peft_model.parameters()).device)
        name, indices = layers if layers is not None else (None, None)
        critic_layers = len(indices) if indices is not None else None
        actor_critic = cls(peft_model, policy_adapter, head, autocast_dtype, critic_layers, name)
        if critic_layers is not None:
            try:
                actor_critic.check_critic_layers()
            except ValueError:
                if getattr(config, "critic_layers", None) is not None:
                    raise
                # Under critic_layer_fraction the adapter stays on the top layers, and its passes run
                # every layer from input_ids: the same critic, without the shortcut.
                actor_critic.critic_layers = None
        return actor_critic

    @property
    def has_critic(self) -> bool:
        """Whether there is a critic (a value adapter and head): GAE's, not the group estimators'."""
        return self.value_head is not None

    @property
    def critic_reads_reference(self) -> bool:
        """Whether the critic runs its top `critic_layers` from the reference forward's hidden states."""
        return self.critic_layers is not None

    # ---- parameters -------------------------------------------------------------------------
    def _adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return [p for name, p in self.peft_model.named_parameters() if "lora_" in name and f".{adapter}." in f"{name}."]

    def policy_parameters(self) -> list[nn.Parameter]:
        """The policy LoRA tensors: the only parameters of the trust-region update."""
        return self._adapter_parameters(self.policy_adapter)

    def value_parameters(self) -> list[nn.Parameter]:
        """The critic's trainable tensors: its LoRA adapter's and the head's (none without a critic)."""
        if not self.has_critic:
            return []
        return self._adapter_parameters(VALUE_ADAPTER) + list(self.value_head.parameters())

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        """Every tensor training moves (the policy and critic LoRA tensors, the value head), by name."""
        moved = {id(p) for p in self.policy_parameters() + self.value_parameters()}
        return {name: p for name, p in self.named_parameters() if id(p) in moved}

    # ---- adapters -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        # PEFT's set_adapter makes the active adapter trainable and freezes the others, which is
        # exactly the isolation we need: critic passes cannot reach the policy tensors. Inside an
        # outer context of the same adapter nothing is switched: switching back on exit would freeze
        # the critic's LoRA tensors between its forward and its backward, and autograd skips a leaf
        # that no longer requires grad (the critic would silently be a head on the frozen base).
        if self.active_adapter == name:
            yield
            return
        self.peft_model.set_adapter(name)
        try:
            yield
        finally:
            self.peft_model.set_adapter(self.policy_adapter)

    @property
    def active_adapter(self) -> str:
        active = self.peft_model.active_adapter
        return active[0] if isinstance(active, list) else active

    # ---- forward passes -----------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, response_length: int, hidden_states: bool = False):
        # logits_to_keep = T+1 runs the LM head on the response positions only; position P-1+t
        # predicts response token t, so the last kept position (which predicts nothing) is dropped.
        with self.autocast():
            return self.peft_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=response_length + 1,
                use_cache=False,
                output_hidden_states=hidden_states,
            )

    def _logits(
        self, input_ids, attention_mask, position_ids, response_length: int, temperature: float
    ) -> torch.Tensor:
        out = self._forward(input_ids, attention_mask, position_ids, response_length)
        return out.logits[:, :-1].float() / temperature

    def policy_logits(
        self, input_ids, attention_mask, position_ids, response_length: int, temperature: float = 1.0
    ) -> torch.Tensor:
        """Logits / temperature of pi_theta at the response positions: [B, T, V]."""
        return self._logits(input_ids, attention_mask, position_ids, response_length, temperature)

    def reference_logits(
        self, input_ids, attention_mask, position_ids, response_length: int, temperature: float = 1.0
    ) -> torch.Tensor:
        """Logits / temperature of pi_ref (all adapters disabled) at the response positions."""
        with self.peft_model.disable_adapter():
            return self._logits(input_ids, attention_mask, position_ids, response_length, temperature)

    def values(
        self, input_ids, attention_mask, position_ids, response_length: int, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """V(s_t) for each response position t (the state before token t is sampled): [B, T].
        With `critic_layers` the critic's top layers start from `features` (from
        `reference_logits_and_critic_inputs`), or from those of a reference forward."""
        if self.critic_reads_reference and features is None:
            _, features = self.reference_logits_and_critic_inputs(
                input_ids, attention_mask, position_ids, response_length
            )
        with self._adapter(VALUE_ADAPTER), self.autocast():
            hidden = self._critic_backbone(input_ids, attention_mask, position_ids, features)
        return self.value_head(hidden[:, -response_length - 1 : -1])

    def _critic_backbone(self, input_ids, attention_mask, position_ids, critic_inputs=None) -> torch.Tensor:
        """The backbone's last hidden states: all layers from `input_ids`, or with `critic_layers`
        only the top ones from `critic_inputs`, the hidden states entering the first of them."""
        backbone = self.peft_model.get_base_model().base_model
        if not self.critic_reads_reference:
            return backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        stack = getattr(backbone, self.layer_list)
        # The backbone runs whatever its layer list holds: its top layers alone, entered with the hidden
        # states below them as `inputs_embeds` (build() checks that this reproduces the full pass).
        setattr(backbone, self.layer_list, nn.ModuleList(list(stack)[len(stack) - self.critic_layers :]))
        try:
            return backbone(
                inputs_embeds=critic_inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        finally:
            setattr(backbone, self.layer_list, stack)

    @contextlib.contextmanager
    def _capture_critic_inputs(self) -> Iterator[dict[str, torch.Tensor]]:
        # A pre-hook on the critic's first layer keeps what enters it: the hidden states below it.
        stack = getattr(self.peft_model.get_base_model().base_model, self.layer_list)
        captured: dict[str, torch.Tensor] = {}

        def keep(module, args, kwargs):
            captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

        handle = stack[len(stack) - self.critic_layers].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield captured
        finally:
            handle.remove()

    def reference_logits_and_critic_inputs(
        self, input_ids, attention_mask, position_ids, response_length: int, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`reference_logits` and, from the same forward, the hidden states entering the critic's
        first layer ([B, P+T, H], detached): below its `critic_layers` the critic is the frozen base,
        so these are the critic's own (critic_layers set only)."""
        with self._capture_critic_inputs() as captured:
            logits = self.reference_logits(input_ids, attention_mask, position_ids, response_length, temperature)
        return logits, captured["hidden"]

    @torch.no_grad()
    def check_critic_layers(self) -> None:
        """Raise unless the backbone's top `critic_layers` entered with the hidden states below them
        give its full pass: a backbone that adds to `inputs_embeds` (GPT-2's position embeddings) or
        indexes its layers by the config's count cannot run its top layers on their own."""
        vocab = self.peft_model.get_base_model().config.get_text_config().vocab_size
        device = next(self.peft_model.parameters()).device
        input_ids = torch.arange(1, 6, device=device).remainder(vocab).unsqueeze(0)
        attention_mask = torch.ones_like(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=device).unsqueeze(0)
        backbone = self.peft_model.get_base_model().base_model
        with self.peft_model.disable_adapter(), self.autocast():
            with self._capture_critic_inputs() as captured:
                full = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            try:
                top = self._critic_backbone(input_ids, attention_mask, position_ids, captured["hidden"])
            except Exception as exc:  # noqa: BLE001 - any failure means the slice is unsupported
                top = exc
        if isinstance(top, Exception) or not torch.allclose(top, full.last_hidden_state, rtol=1e-3, atol=1e-4):
            raise ValueError(
                f"critic_layers={self.critic_layers}: {type(backbone).__name__} does not reproduce its full pass when "
                f"its top layers run alone from the hidden states below them"
                f"{f' ({top})' if isinstance(top, Exception) else ''}; leave critic_layers unset."
            )

    @contextlib.contextmanager
    def critic_training(self) -> Iterator[None]:
        """The critic adapter active and trainable, dropout on; the policy adapter inactive and frozen."""
        with self._adapter(VALUE_ADAPTER):
            self.peft_model.train()
            self.value_head.train()
            try:
                yield
            finally:
                self.peft_model.eval()
                self.value_head.eval()

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Policy adapter at `path` (loadable by `PeftModel.from_pretrained(base, path)`), the critic
        adapter and head under `path/value`."""
        from safetensors.torch import save_file

        path = Path(path)
        broken = [name for name, tensor in self.trainable_tensors().items() if not torch.isfinite(tensor).all()]
        if broken:
            raise ValueError(f"Refusing to save non-finite tensors ({len(broken)}, e.g. {broken[0]}) to {path}.")
        path.mkdir(parents=True, exist_ok=True)
        # The base weights never change, so adapted embedding/LM-head layers need not be copied.
        self.peft_model.save_pretrained(path, selected_adapters=[self.policy_adapter], save_embedding_layers=False)
        if self.policy_adapter != "default":
            # PEFT writes a non-default adapter into a sub-folder; move it to `path` itself.
            sub = path / self.policy_adapter
            for item in sub.iterdir():
                shutil.move(str(item), path / item.name)
            sub.rmdir()
        if not self.has_critic:
            return
        value_dir = path / VALUE_ADAPTER
        self.peft_model.save_pretrained(value_dir, selected_adapters=[VALUE_ADAPTER], save_embedding_layers=False)
        value_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
            value_dir / "value_head.safetensors",
        )

    def load_policy_adapter(self, path: str | os.PathLike) -> None:
        """Load the policy adapter written by `save_pretrained(path)` into the policy's LoRA tensors."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(Path(path) / "adapter_model.safetensors")
        set_peft_model_state_dict(self.peft_model, state, adapter_name=self.policy_adapter)

    def load_value_function(self, path: str | os.PathLike) -> None:
        """Load a critic written by `save_pretrained(path)` (nothing to load without a critic)."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        if not self.has_critic:
            return
        adapter_file = Path(path) / VALUE_ADAPTER / VALUE_ADAPTER / "adapter_model.safetensors"
        if not adapter_file.exists():
            raise ValueError(
                f"{path} holds no critic adapter ({adapter_file} is missing): it was saved without a critic "
                "(advantage_estimator grpo or rloo; resume it with the one it ran with) or with critic "
                "'policy_features', which this release removed (docs/results.md); its policy adapter loads alone."
            )
        saved_state = load_file(adapter_file)
        own = get_peft_model_state_dict(self.peft_model, adapter_name=VALUE_ADAPTER, save_embedding_layers=False)
        if set(saved_state) != set(own):
            # PEFT loads whatever keys match and skips the rest: a critic saved on other layers or
            # modules would come back half-trained.
            raise ValueError(
                f"{path} holds a critic adapter on other layers or modules ({len(saved_state)} tensors, e.g. "
                f"{sorted(set(saved_state) - set(own))[:1]}) than this model's ({len(own)} tensors): build the "
                "trainer with the critic_layer_fraction, critic_layers and critic_lora_target_modules it was "
                "saved with (its trainer_config.json; runs saved before critic_layer_fraction existed used "
                "--critic_layer_fraction 1.0 --critic_lora_target_modules set to their lora_target_modules)."
            )
        set_peft_model_state_dict(self.peft_model, saved_state, adapter_name=VALUE_ADAPTER)
        self.value_head.load_state_dict(load_file(Path(path) / VALUE_ADAPTER / "value_head.safetensors"))
