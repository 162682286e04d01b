"""Checks the cross-fitted gain against an independent estimate of the true gradient: K batches
of 16 prompts from one policy (no update between them), each batch's gradient g_b cross-fitted
over 4 and over 16 chunks of its sequences, against G_-b^T g_b with G_-b the mean gradient of
the other K - 1 batches (unbiased for E[g]^T E[g], as the cross-fit is). Plain gradient steps
(no preconditioner, no momentum), at the LoRA initialisation or after --warm_steps
TRPO steps. With --by_group, the in-sample and cross-fitted gains summed over the batches per
group of LoRA tensors (module, A or B, third of the layers): where the signal is. With
--pooled, each pair of batches is also cross-fitted as one batch of 32 (its 8 chunks): the signal
share at twice the batch, from the same sequences. With --advantages, each batch's gradient is
also taken with other advantage estimators on the same sequences (GAE lambda 1 and 0.8, and no
critic at all), each scored against the other batches' mean gradient with lambda 1 (the critic
only a baseline there, so that direction is unbiased): which estimator's step carries the most
signal per unit of its noise.

    HF_HUB_OFFLINE=1 python recipes/results/frontier_proxy_cpu/gradient_noise/validate.py > validate.txt
"""

import argparse
import dataclasses
import re
import statistics
from collections import defaultdict

import torch

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments import build_task
from trpo_rlhf.experiments.sentiment import use_all_cpu_cores
from trpo_rlhf.trust_region import cross_fitted_gain, cross_fitted_gain_terms

parser = argparse.ArgumentParser()
parser.add_argument("--batches", type=int, default=8)
parser.add_argument("--warm_steps", type=int, default=0)
parser.add_argument("--by_group", action="store_true")
parser.add_argument("--pooled", action="store_true")
parser.add_argument("--advantages", action="store_true")
args = parser.parse_args()
use_all_cpu_cores()
task = build_task("sentiment", seed=0, model="embedded", reward_model="vader", dataset=None)
config = TRPOConfig(
    output_dir="/tmp/cross_fit_validation",
    overwrite_output_dir=True,
    batch_size=16,
    max_new_tokens=24,
    lora_target_modules=task.lora_target_modules,
    cg_preconditioner="none",
    momentum=0.0,
)
trainer = TRPOTrainer(config, task.model, task.tokenizer, task.reward_model, task.prompts)
for _ in range(args.warm_steps):
    trainer.step()


def group_of(name: str, layers: int = 30) -> str:
    layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
    module = re.search(r"\.(\w+_proj)\.", name).group(1)
    tensor = "A" if "lora_A" in name else "B"
    return f"{module} {tensor}, layers {['0-9', '10-19', '20-29'][3 * layer // layers]}"


names = {id(p): n for n, p in trainer.actor_critic.named_parameters()}
groups = [group_of(names[id(p)]) for p in trainer.actor_critic.policy_parameters()]
sizes = [p.numel() for p in trainer.actor_critic.policy_parameters()]
group_in_sample, group_cross = defaultdict(float), defaultdict(float)
rows, pieces = [], []
# (name, GAE lambda, whether the critic's values enter): the run's estimator first.
ESTIMATORS = [("GAE 0.95, critic (the defaults)", 0.95, True), ("GAE 1.0, critic", 1.0, True)]
ESTIMATORS += [("GAE 0.8, critic", 0.8, True), ("no critic (lambda 1, values 0)", 1.0, False)]
estimator_grads = defaultdict(list)


def advantages_by(batch, gae_lambda: float, with_critic: bool):
    """`batch` with its advantages taken again by another estimator, on the same sequences."""
    values = batch.values if with_critic else torch.zeros_like(batch.values)
    run_config = trainer.config
    trainer.config = dataclasses.replace(run_config, gae_lambda=gae_lambda)
    try:
        return trainer._advantages(dataclasses.replace(batch, values=values))[0]
    finally:
        trainer.config = run_config


for _ in range(args.batches):
    batch = trainer.collect_batch()[0]
    four, sixteen = trainer.chunked_gradient(batch, 4), trainer.chunked_gradient(batch, 16)
    if args.advantages:
        # The run's own estimator is the batch's advantages as sampled: its gradient is `four`'s.
        estimator_grads[ESTIMATORS[0][0]].append(four.grad)
        for name, gae_lambda, with_critic in ESTIMATORS[1:]:
            estimator_grads[name].append(
                trainer.chunked_gradient(advantages_by(batch, gae_lambda, with_critic), 4).grad
            )
    pieces.append((four.chunk_grads, four.chunk_shares, batch.response_mask.sum().item()))
    if args.by_group:
        cross, in_sample = cross_fitted_gain_terms(four.chunk_grads, four.chunk_shares)
        for name, in_part, cross_part in zip(groups, in_sample.split(sizes), cross.split(sizes)):
            group_in_sample[name] += in_part.sum().item()
            group_cross[name] += cross_part.sum().item()
    rows.append(
        (
            four.grad,
            cross_fitted_gain(four.chunk_grads, four.chunk_shares),
            cross_fitted_gain(sixteen.chunk_grads, sixteen.chunk_shares),
        )
    )
grads = torch.stack([row[0] for row in rows])
independent = [torch.dot((grads.sum(0) - g) / (len(rows) - 1), g).item() for g in grads]
print("batch | in-sample g.g | cross-fitted, 4 chunks | cross-fitted, 16 chunks | other batches' mean . g")
for k, ((_, (cross4, in_sample), (cross16, _)), other) in enumerate(zip(rows, independent)):
    print(f"{k} | {in_sample:.4g} | {cross4:.4g} | {cross16:.4g} | {other:.4g}")
print(
    f"mean | {statistics.mean(r[1][1] for r in rows):.4g} | {statistics.mean(r[1][0] for r in rows):.4g} | "
    f"{statistics.mean(r[2][0] for r in rows):.4g} | {statistics.mean(independent):.4g}"
)
if args.by_group:
    print()
    print("group | in-sample share | cross-fitted share | cross-fitted / in-sample")
    total_in, total_cross = sum(group_in_sample.values()), sum(group_cross.values())
    for name in sorted(group_in_sample):
        i, c = group_in_sample[name], group_cross[name]
        print(f"{name} | {i / total_in:.3f} | {c / total_cross:.3f} | {c / i:.4f}")
if args.pooled:
    print()
    print("batches | in-sample g.g | cross-fitted | ratio")
    singles = [cross_fitted_gain(grads, shares) for grads, shares, _ in pieces]
    pooled = []
    for (grads_a, shares_a, tokens_a), (grads_b, shares_b, tokens_b) in zip(pieces[::2], pieces[1::2]):
        weight_a, weight_b = tokens_a / (tokens_a + tokens_b), tokens_b / (tokens_a + tokens_b)
        pooled.append(
            cross_fitted_gain(
                torch.cat([grads_a * weight_a, grads_b * weight_b]),
                torch.cat([shares_a * weight_a, shares_b * weight_b]),
            )
        )
    for label, gains in (("16 prompts", singles), ("32 prompts", pooled)):
        cross, in_sample = statistics.mean(c for c, _ in gains), statistics.mean(i for _, i in gains)
        print(f"{len(gains)} of {label} | {in_sample:.4g} | {cross:.4g} | {cross / in_sample:.4f}")
if args.advantages:
    print()
    print(
        "advantages | in-sample g.g | other batches' lambda-1 mean . g | per unit of noise: mean . g / sqrt(g.g) "
        "| cosine to the defaults' g"
    )
    reference = torch.stack(estimator_grads["GAE 1.0, critic"])
    others = (reference.sum(0) - reference) / (len(reference) - 1)
    defaults = torch.stack(estimator_grads[ESTIMATORS[0][0]])
    for name, *_ in ESTIMATORS:
        grads_e = torch.stack(estimator_grads[name])
        in_sample = (grads_e * grads_e).sum(1).mean().item()
        signal = (others * grads_e).sum(1).mean().item()
        cosine = torch.nn.functional.cosine_similarity(grads_e, defaults, dim=1).mean().item()
        print(f"{name} | {in_sample:.4g} | {signal:.4g} | {signal / in_sample**0.5:.4g} | {cosine:.3f}")
