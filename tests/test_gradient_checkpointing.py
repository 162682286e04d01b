"""`gradient_checkpointing`: each decoder layer keeps only its inputs in a graph and recomputes its
activations in the backward, and every gradient, Fisher product and metric is the one without it."""

import pytest
import torch
from test_checkpoints import assert_same_tensors, make, read_rows, tensors, without_timings

from trpo_rlhf.actor_critic import checkpoint_decoder_layers, double_backward_attention
from trpo_rlhf.experiments.toy import build_tiny_lm


def graph_bytes(model, input_ids):
    """Bytes of the tensors autograd saves for the backward of one forward of `model` (a
    checkpointed layer's own saved tensors are packed by its checkpoint, not here)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(input_ids=input_ids, use_cache=False).logits
    return logits, total


def count_layer_forwards(monkeypatch, model):
    """A list that grows by one at every run of a decoder layer's forward, the recomputations too."""
    runs = []
    layer_class = type(model.model.layers[0])
    forward = layer_class.forward

    def counted(self, *args, **kwargs):
        runs.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", counted)
    return runs


def test_checkpointed_layers_recompute_in_the_backward_and_give_the_same_gradients(word_tokenizer, monkeypatch):
    model = build_tiny_lm(word_tokenizer).eval()
    input_ids = torch.randint(0, len(word_tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    runs = count_layer_forwards(monkeypatch, model)
    layers = len(model.model.layers)

    def gradients_and_curvature():
        logits, saved = graph_bytes(model, input_ids)
        loss = torch.log_softmax(logits, -1)[..., 3].mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        forwards = len(runs)
        # A Hessian-vector product: the double backward the Fisher-vector products take.
        curvature = torch.autograd.grad(sum(g.sum() for g in grads), params)
        return [g.detach() for g in grads], curvature, saved, forwards

    plain_grads, plain_curvature, plain_saved, plain_forwards = gradients_and_curvature()
    assert plain_forwards == layers
    runs.clear()

    assert checkpoint_decoder_layers(model) == layers
    grads, curvature, saved, forwards = gradients_and_curvature()
    assert forwards == 2 * layers  # each layer ran again in the backward
    assert saved < 0.5 * plain_saved
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert all(torch.equal(a, b) for a, b in zip(curvature, plain_curvature))

    runs.clear()
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    assert len(runs) == layers  # without a graph, no checkpoint

    checkpoint_decoder_layers(model, enabled=False)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert graph_bytes(model, input_ids)[1] == plain_saved


def test_the_recomputation_runs_the_attention_its_forward_ran(word_tokenizer):
    """A Fisher forward runs SDPA on its math backend (`double_backward_attention`), but the backward
    that recomputes it runs outside that context: it must not recompute with the fused kernel,
    whose saved tensors differ (torch raises CheckpointError)."""
    model = build_tiny_lm(word_tokenizer, attn_implementation="sdpa").eval()
    input_ids = torch.randint(0, len(word_tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]

    def curvature():
        with double_backward_attention(model):
            logits = model(input_ids=input_ids, use_cache=False).logits
        grads = torch.autograd.grad(torch.log_softmax(logits, -1)[..., 3].mean(), params, create_graph=True)
        return torch.autograd.grad(sum(g.sum() for g in grads), params)

    plain = curvature()
    checkpoint_decoder_layers(model)
    assert all(torch.equal(a, b) for a, b in zip(curvature(), plain))


def test_a_model_without_decoder_layer_classes_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"gradient_checkpointing: Linear names no decoder layer .*leave"):
        checkpoint_decoder_layers(torch.nn.Linear(2, 2))
    assert checkpoint_decoder_layers(torch.nn.Linear(2, 2), enabled=False) == 0


@pytest.mark.parametrize(
    "algorithm, settings",
    [
        ("trpo", {}),  # the defaults: the gradient pass, forward-only probes
        ("trpo", {"cg_iters": 3, "fisher_chunks": 1}),  # products on the gradient's own graph
        ("trpo", {"cg_iters": 3, "fvp_method": "kl_hessian"}),
        ("ppo", {}),
    ],
)
def test_a_checkpointed_run_takes_the_steps_of_the_plain_run_bitwise(
    algorithm, settings, tmp_path, word_tokenizer, monkeypatch
):
    layer_runs = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        trainer = make(
            algorithm, word_tokenizer, tmp_path / name, max_steps=2, gradient_checkpointing=checkpointing, **settings
        )
        runs = count_layer_forwards(monkeypatch, trainer.actor_critic.peft_model.get_base_model())
        trainer.train()
        layer_runs[name] = (len(runs), tensors(trainer))
        monkeypatch.undo()
    # Every backward (policy, Fisher products, critic) ran its layers once more ...
    assert layer_runs["checkpointed"][0] > layer_runs["plain"][0]
    # ... and every metric and tensor is the plain run's, the critic's (dropout on) too: the
    # recomputation replays the forward's random state.
    assert without_timings(read_rows(tmp_path / "plain" / "metrics.jsonl")) == without_timings(
        read_rows(tmp_path / "checkpointed" / "metrics.jsonl")
    )
    assert_same_tensors(layer_runs["plain"][1], layer_runs["checkpointed"][1])
