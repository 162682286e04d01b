"""TRPO (Schulman et al. 2015) over the policy LoRA tensors: `TRPOConfig` (the trust-region
solver's settings) and `TRPOTrainer` (its policy update on the shared engine).

    >>> from trpo_rlhf import TRPOConfig
    >>> config = TRPOConfig(output_dir="runs/x", max_steps=50, max_kl=0.01)
    >>> config.cg_iters
    4
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from .actor_critic import double_backward_attention
from .config import RLConfig, _require
from .engine import RLTrainer, require_finite
from .profiling import PhaseTimer
from .rollout import Rollout, log_softmax_, token_logprobs
from .trust_region import (
    FVP_METHODS,
    DampedFisherProduct,
    LinearizedLogits,
    LineSearchResult,
    backtracking_line_search,
    cg_first_iterate,
    cg_solve,
    flat_grad,
    forward_tangents,
    kl_fisher_product,
    logit_fisher_quadratic,
    relative_damping,
    surrogate_gradient,
)

MAX_KL_LIMIT = 1.0  # nats per completion: a trust region beyond it bounds nothing the quadratic model can size
# No line search ran: g = 0 left no direction.
NO_STEP = LineSearchResult(accepted=False, step_frac=0.0, kl=0.0, surrogate_gain=0.0, iterations=0)


@dataclass
class TRPOConfig(RLConfig):
    """TRPO settings (Schulman et al. 2015, "Trust Region Policy Optimization", Appendix C).

    The update maximises the surrogate L(theta) = mean_t[ratio_t * A_t] subject to
    KL(pi_old || pi_theta) <= max_kl per completion, over the policy LoRA tensors only. Where a default
    departs from the paper's, the reason is the scale of a LoRA Fisher or of an RLHF run; the
    measurements behind each are in docs/results.md and docs/algorithm.md:

    * ``cg_iters`` = 4 (the paper's 10): CG on Fisher-vector products, the natural gradient. With
      the damping 0.1 four iterations take the step that ten do, to within the seeds' noise on the
      exact task, for 4 products instead of 10, most of an update's cost. ``cg_iters`` = 1 steps
      along the gradient itself, sized by its exact quadratic g^T F g from forward-mode passes and
      no product at all: what a sharded base (FSDP, ZeRO-3) can run.
    * ``max_kl`` = 0.01 nats per completion (the paper bounds a mean over states, here tokens): an
      RLHF run is judged by its reward at KL budgets to the reference counted per completion
      (``kl/ref``), so the trust region is counted in the same unit, and an update moves a
      one-token and a 512-token completion alike. A larger step reaches the largest budgets within
      a handful of updates, leaving the smaller ones one or two points.
    * ``cg_damping`` = 0.1, relative: c = 0.1 * g^T F g / g^T g in (F + cI) x = g, a tenth of the
      Fisher's curvature along the gradient, so the same setting damps alike on every model; the
      step's length comes from F alone (1/2 s^T (nF) s = delta), so an update spends delta.
    * ``backtrack_coef`` = 0.8 (SB3-contrib) rather than the paper's 0.5: finer steps lose less of
      a good direction when the quadratic model overestimates.
    * ``accept_ratio`` = 0.1: a step must realise at least 10 % of the improvement predicted by
      the linear model (Schulman's ``linesearch``), as well as any improvement at all.
    * ``fvp_subsample`` = 1.0 (the paper used 10 %): the Fisher on the whole batch; lower it when
      memory, not step quality, is the limit.
    * ``fisher_chunks`` = 4: the gradient and each Fisher-vector product run over 4 chunks of the
      batch's sequences, one chunk's graph at a time: about a quarter of the memory of one graph
      kept for every product, for one more forward and backward per chunk and product.
    * ``fvp_method`` = "gauss_newton": F v = J^T M J v, one tangent pass and one backward per
      product, cheaper than the double backward of "kl_hessian" and the same matrix.
    """

    max_kl: float = field(
        default=0.01,
        metadata={"help": "delta: bound on one update's KL(pi_old || pi_new) per completion, summed over its tokens."},
    )
    kl_tolerance: float = field(
        default=1.5, metadata={"help": "Accept a line-search point only if measured KL <= kl_tolerance * max_kl."}
    )
    cg_iters: int = field(
        default=4,
        metadata={
            "help": "Conjugate-gradient iterations (Fisher-vector products) per update. 10: the classic TRPO solve. "
            "1: the gradient, sized by the Fisher with no product (what a sharded base can run)."
        },
    )
    cg_damping: float = field(
        default=0.1,
        metadata={
            "help": "Relative damping: (F + c I) x = g with c = cg_damping * g^T F g / g^T g (docs/algorithm.md)."
        },
    )
    cg_residual_tol: float = field(
        default=1e-10, metadata={"help": "Stop CG once r.r <= cg_residual_tol * g.g (relative squared residual)."}
    )
    line_search_steps: int = field(default=10, metadata={"help": "Backtracking attempts before the step is rejected."})
    backtrack_coef: float = field(
        default=0.8, metadata={"help": "Step fraction decay per backtracking attempt, in (0, 1)."}
    )
    accept_ratio: float = field(
        default=0.1, metadata={"help": "Required ratio of realised to linearly predicted improvement."}
    )
    fvp_subsample: float = field(
        default=1.0, metadata={"help": "Fraction of the batch's sequences used for Fisher-vector products."}
    )
    fisher_chunks: int = field(
        default=4,
        metadata={
            "help": "Passes the policy gradient and each Fisher-vector product are split into, by sequences. 1: one "
            "pass over the batch, whose retained graph serves g and every product. N > 1: one chunk's graph at a time "
            "(about 1/N of the memory) for one more forward and backward per chunk and product."
        },
    )
    fvp_method: str = field(
        default="gauss_newton",
        metadata={
            "help": "How F v is computed: 'gauss_newton' (J^T M J v, two passes over one retained graph) or "
            "'kl_hessian' (double backward through the KL gradient). Both are the exact Fisher at theta_old."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            0 < self.max_kl <= MAX_KL_LIMIT,
            f"max_kl={self.max_kl} must be in (0, {MAX_KL_LIMIT}] nats per completion, e.g. --max_kl 0.01: the quadratic "
            "model of the KL that sizes the step holds only near the old policy (Schulman et al. 2015, sec. 6).",
        )
        _require(
            self.kl_tolerance >= 1.0,
            f"kl_tolerance={self.kl_tolerance} must be >= 1 (1.5 allows the usual quadratic-model error).",
        )
        _require(
            self.cg_iters >= 1,
            f"cg_iters={self.cg_iters} must be >= 1: conjugate gradient needs at least one iteration, e.g. --cg_iters 10.",
        )
        _require(self.cg_damping >= 0, f"cg_damping={self.cg_damping} must be >= 0.")
        _require(self.cg_residual_tol >= 0, f"cg_residual_tol={self.cg_residual_tol} must be >= 0.")
        _require(self.line_search_steps >= 1, f"line_search_steps={self.line_search_steps} must be >= 1.")
        _require(
            0.0 < self.backtrack_coef < 1.0,
            f"backtrack_coef={self.backtrack_coef} must lie strictly between 0 and 1, e.g. --backtrack_coef 0.8 (or 0.5).",
        )
        _require(self.accept_ratio >= 0, f"accept_ratio={self.accept_ratio} must be >= 0 (0 accepts any improvement).")
        _require(0.0 < self.fvp_subsample <= 1.0, f"fvp_subsample={self.fvp_subsample} must be in (0, 1].")
        _require(
            self.fvp_method in FVP_METHODS,
            f"fvp_method={self.fvp_method!r} is not one of {FVP_METHODS}; use 'gauss_newton' (faster) or 'kl_hessian'.",
        )
        _require(
            self.fisher_chunks >= 1,
            f"fisher_chunks={self.fisher_chunks} must be >= 1 (1: one pass over the batch), e.g. --fisher_chunks 4.",
        )


class PolicyGradient(NamedTuple):
    grad: torch.Tensor  # g, averaged across processes
    surrogate_old: float  # L(theta_old), averaged across processes
    logp_all_old: torch.Tensor  # log pi_old over the vocabulary [B, T, V], this process's
    fvp: DampedFisherProduct | None  # v -> (F + cI) v, None for a one-iteration solve


class TRPOTrainer(RLTrainer):
    """TRPO over the policy LoRA tensors (Schulman et al. 2015), see `policy_update`.

    >>> trainer = TRPOTrainer(config=TRPOConfig(max_steps=50), model="embedded",
    ...                       reward_fn="vader", train_dataset=default_prompts())    # doctest: +SKIP
    >>> stats = trainer.step()                                                        # doctest: +SKIP
    >>> stats["trpo/kl"] <= config.kl_tolerance * config.max_kl                     # doctest: +SKIP
    True
    """

    progress_name = "TRPO"

    def __init__(self, config: TRPOConfig, *args, **kwargs):
        if not isinstance(config, TRPOConfig):
            raise TypeError(f"TRPOTrainer needs a TRPOConfig, got {type(config).__name__}.")
        super().__init__(config, *args, **kwargs)

    def _check_shardable(self) -> None:
        if self.config.cg_iters > 1:
            raise ValueError(
                f"cg_iters={self.config.cg_iters} with the frozen base sharded (fsdp.yaml, deepspeed_zero3.yaml): "
                "Fisher-vector products run several backward passes over one forward's graph, whose gathered layer "
                "weights the sharding frees after the first. Pass --cg_iters 1 (the gradient sized by the Fisher, "
                "no product) or launch with recipes/accelerate_configs/multi_gpu.yaml."
            )

    def policy_update(self, batch: Rollout) -> dict[str, float]:
        """One TRPO step (Schulman et al. 2015, Appendix C):

        1. g = grad L(theta_old), L = mean_t exp(logp_theta - logp_old) * A_t;
        2. x ~ (F + cI)^-1 g by `cg_iters` CG iterations on Fisher-vector products (`fisher_product`);
           at one iteration x is along g and needs only g^T F g, from forward-mode passes;
        3. full step s = sqrt(2 delta / (n x^T F x)) x, so that 1/2 s^T (n F) s = delta, F the Fisher of
           the mean per-token KL and n the tokens per completion (n F: the completion's KL);
        4. backtracking on the measured exact KL per completion and the surrogate; exact restore on failure.
        """
        cfg, timer = self.config, PhaseTimer()
        fisher_batch = self.fisher_batch(batch)
        grad, surrogate_old, logp_all_old, fvp = self.gradient_and_fisher(batch, fisher_batch, timer)
        grad_sq = torch.dot(grad, grad).item()
        with timer("cg"):
            if fvp is None:
                damping = 0.0  # the step is along g whatever the damping
                cg = cg_first_iterate(grad, self.fisher_quadratic(fisher_batch, grad))
            else:
                damping, first_product = 0.0, None  # g = 0: CG stops at once
                if grad_sq > 0:
                    # The damping is relative to the Fisher's curvature along g, read off CG's first
                    # product (F g), so the step does not depend on the parameters' scale.
                    fisher_grad = fvp.undamped(grad)
                    damping = fvp.damping = relative_damping(grad, fisher_grad, cfg.cg_damping)
                    first_product = fisher_grad + damping * grad
                # The tolerance is relative: LoRA gradients can be far smaller than any absolute one.
                cg = cg_solve(fvp, grad, cfg.cg_iters, cfg.cg_residual_tol * grad_sq, first_product=first_product)
        require_finite("CG solution", cg.x, torch.tensor(cg.x_ax))
        # x^T F x, the KL's own quadratic model: the damping shapes the direction, never the length.
        kl_quadratic = cg.x_ax - damping * torch.dot(cg.x, cg.x).item()
        stats = {
            "trpo/grad_norm": grad.norm().item(),
            "trpo/cg_residual": cg.residual / grad_sq if grad_sq > 0 else 0.0,
            "trpo/cg_iters": float(cg.iterations),
            "trpo/fvp_count": float(fvp.calls if fvp is not None else 0),
            "trpo/damping": damping,
            "trpo/surrogate_old": surrogate_old,
        }
        del fvp  # free the Fisher graph before the line search
        if not kl_quadratic > 0:  # g = 0 (e.g. all advantages equal), or no curvature: no step to size
            return stats | self._step_stats(timer, NO_STEP, expected_gain=0.0, full_step_norm=0.0)
        # delta bounds the KL per completion, n times the per-token mean whose Fisher F is.
        full_step = math.sqrt(2 * cfg.max_kl / (self.tokens_per_completion(batch) * kl_quadratic)) * cg.x
        require_finite("step", full_step)
        expected_gain = torch.dot(grad, full_step).item()
        with timer("line_search"):
            result = self.line_search(batch, logp_all_old, full_step, expected_gain)
        return stats | self._step_stats(timer, result, expected_gain, full_step.norm().item())

    def line_search(
        self, batch: Rollout, logp_all_old: torch.Tensor, full_step: torch.Tensor, expected_gain: float
    ) -> LineSearchResult:
        """Backtracking from theta_old + `full_step` on the exact KL to pi_old and the surrogate,
        both measured on `batch` (`backtracking_line_search`); theta_old restored bitwise on failure."""
        cfg = self.config
        return backtracking_line_search(
            self.actor_critic.policy_parameters(),
            full_step,
            expected_gain,
            lambda: self.measure_policy_change(batch, logp_all_old),
            max_kl=cfg.max_kl,
            kl_tolerance=cfg.kl_tolerance,
            backtrack_coef=cfg.backtrack_coef,
            max_backtracks=cfg.line_search_steps,
            accept_ratio=cfg.accept_ratio,
        )

    def gradient_and_fisher(self, batch: Rollout, fisher_batch: Rollout, timer: PhaseTimer) -> PolicyGradient:
        """g, L(theta_old), log pi_old over the vocabulary and, for CG beyond one iteration, the Fisher
        product. With the Fisher on the whole batch in one pass (`fisher_chunks` 1, `fvp_subsample` 1),
        one forward serves g and F (`surrogate_gradient`); otherwise g comes chunk by chunk and the
        Fisher builds its own graphs."""
        cfg = self.config
        products = cfg.cg_iters > 1
        if cfg.fisher_chunks > 1 or not (products and fisher_batch is batch):
            with timer("gradient"):
                grad, surrogate_old, logp_all_old = self.chunked_gradient(batch, cfg.fisher_chunks)
            with timer("fvp_graph"):
                fvp = self.fisher_product(fisher_batch) if products else None
            return PolicyGradient(grad, surrogate_old, logp_all_old, fvp)
        with timer("gradient"):
            logits = self.fisher_logits(batch)
            surrogate = self.surrogate(batch, token_logprobs(logits, batch.response_ids))
            surrogate_old = self.reduce_mean(surrogate.detach()).item()
            linearize = cfg.fvp_method == "gauss_newton"
            grad, jacobian = surrogate_gradient(
                surrogate, logits, self.actor_critic.policy_parameters(), linearize=linearize, retain_graph=True
            )
            grad = self.reduce_mean(grad)
            del surrogate
        require_finite("policy gradient", grad)
        with timer("fvp_graph"):
            fvp = self.fisher_product(batch, logits, jacobian)
            del jacobian
            # pi_old over the vocabulary, for the line-search KL: the gradient's own logits, turned
            # into log-probs in place once the Fisher has taken its probabilities from them (no
            # second forward, no copy; nothing left in any graph reads these values).
            logp_all_old = log_softmax_(logits.detach())
        return PolicyGradient(grad, surrogate_old, logp_all_old, fvp)

    def fisher_batch(self, batch: Rollout) -> Rollout:
        """The sequences the Fisher is estimated on: `fvp_subsample` of the batch, drawn from the
        minibatch generator (the whole batch itself at 1.0)."""
        n = max(1, round(self.config.fvp_subsample * len(batch)))
        if n == len(batch):
            return batch
        return batch.select(torch.randperm(len(batch), generator=self.minibatch_generator)[:n])

    def fisher_logits(self, batch: Rollout) -> torch.Tensor:
        """The policy's logits with a graph, attention on the double-backward-capable path (both
        Fisher forms differentiate a gradient; the fused kernels cannot)."""
        with double_backward_attention(self.actor_critic.peft_model):
            return self.policy_logits(batch)

    @staticmethod
    def sequence_chunks(batch: Rollout, chunks: int) -> list[tuple[Rollout, torch.Tensor]]:
        """`batch` split into `chunks` runs of sequences (fewer for a smaller batch), each with its
        share of the batch's valid tokens."""
        total = batch.response_mask.sum().clamp(min=1)
        parts = [batch.select(index) for index in torch.arange(len(batch)).chunk(chunks)]
        return [(part, part.response_mask.sum() / total) for part in parts]

    def chunked_gradient(self, batch: Rollout, chunks: int) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(g, L(theta_old), log pi_old over the vocabulary) from one forward and backward per chunk,
        no graph kept past its chunk: the surrogate is a token mean, so g is the token-share-weighted
        sum of the chunks' gradients."""
        params = self.actor_critic.policy_parameters()
        grads, surrogates, logp_all_old = [], [], []
        for chunk, share in self.sequence_chunks(batch, chunks):
            logits = self.policy_logits(chunk)
            surrogate = share * self.surrogate(chunk, token_logprobs(logits, chunk.response_ids))
            grads.append(flat_grad(surrogate, params))
            surrogates.append(surrogate.detach())
            logp_all_old.append(log_softmax_(logits.detach()))
            del logits, surrogate
        grad = self.reduce_mean(torch.stack(grads).sum(dim=0))
        require_finite("policy gradient", grad)
        return grad, self.reduce_mean(torch.stack(surrogates).sum()).item(), torch.cat(logp_all_old)

    def fisher_product(
        self, batch: Rollout, logits: torch.Tensor | None = None, jacobian: LinearizedLogits | None = None
    ) -> DampedFisherProduct:
        """v -> (F + cI) v over the policy LoRA tensors, F the Fisher of the mean per-token KL at
        theta_old on `batch` (`logits` from `fisher_logits(batch)` when already computed, and a
        `jacobian` already built on them are reused), averaged across processes. With
        `fisher_chunks` > 1 F is the token-share-weighted sum of the chunks' Fishers (the KL is a
        token mean too), each product rebuilding one chunk's graph at a time."""
        cfg, params = self.config, self.actor_critic.policy_parameters()
        if logits is not None or cfg.fisher_chunks == 1:
            logits = self.fisher_logits(batch) if logits is None else logits
            return kl_fisher_product(
                logits,
                batch.response_mask,
                params,
                method=cfg.fvp_method,
                damping=0.0,  # set relative to F in policy_update
                reduce=self.reduce_mean,
                jacobian=jacobian,
            )
        chunks = self.sequence_chunks(batch, cfg.fisher_chunks)

        def over_chunks(v: torch.Tensor) -> torch.Tensor:
            total = None
            for chunk, share in chunks:
                product = kl_fisher_product(
                    self.fisher_logits(chunk), chunk.response_mask, params, method=cfg.fvp_method, damping=0.0
                )
                part = share * product.fisher_product(v).float()
                total = part if total is None else total + part
                del product
            return total

        return DampedFisherProduct(over_chunks, 0.0, self.reduce_mean)  # damping: see policy_update

    def fisher_quadratic(self, batch: Rollout, x: torch.Tensor) -> float:
        """x^T F x over the policy LoRA tensors, F the Fisher of the mean per-token KL on
        `batch`, averaged across processes: from forward-mode passes (J x with the logits, one
        `fisher_chunks` chunk at a time, no graph kept), which is all the Fisher a one-iteration
        step needs (`cg_first_iterate`): no backward at all, where a product costs three."""
        params = self.actor_critic.policy_parameters()
        total = batch.response_mask.sum().clamp(min=1)
        quadratic = torch.zeros((), device=x.device)
        model = self.actor_critic.peft_model
        for chunk, _ in self.sequence_chunks(batch, self.config.fisher_chunks):
            # Forward-mode AD has no rule for the fused attention kernels; the math path has one.
            with torch.no_grad(), double_backward_attention(model), forward_tangents(model, params, x):
                logits, tangent = forward_ad.unpack_dual(self.policy_logits(chunk))
                quadratic = quadratic + logit_fisher_quadratic(logits, tangent, chunk.response_mask / total)
            del logits, tangent
        return self.reduce_mean(quadratic).item()

    def _step_stats(
        self, timer: PhaseTimer, result: LineSearchResult, expected_gain: float, full_step_norm: float
    ) -> dict[str, float]:
        """The line search's outcome; a rejected step reports zeros and the full step's expected gain."""
        frac = result.step_frac if result.accepted else 1.0
        return {
            "trpo/accepted": float(result.accepted),
            "trpo/kl": result.kl,
            # KL(pi_old || pi_old + a s) ~ a^2 * 1/2 s^T (nF) s to second order, and 1/2 s^T (nF) s = delta.
            "trpo/kl_predicted": self.config.max_kl * result.step_frac**2,
            "trpo/step_frac": result.step_frac,
            "trpo/surrogate_gain": result.surrogate_gain,
            "trpo/expected_gain": expected_gain * frac,
            "trpo/line_search_iters": float(result.iterations),
            "trpo/step_norm": full_step_norm * result.step_frac,
            **{f"time/policy_{k}": v for k, v in timer.seconds.items()},
        }

    def _progress_fields(self, stats: dict[str, float]) -> dict[str, str]:
        if "trpo/kl" not in stats:  # a step rejected for a non-finite value
            return {"nonfinite": "rejected"}
        return {"trpo_kl": f"{stats['trpo/kl']:.4f}", "acc": f"{int(stats['trpo/accepted'])}"}
