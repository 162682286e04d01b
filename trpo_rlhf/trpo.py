"""TRPO (Schulman et al. 2015) over the policy LoRA tensors: `TRPOConfig` (the trust-region
solver's settings) and `TRPOTrainer` (its policy update on the shared engine).

    >>> from trpo_rlhf import TRPOConfig
    >>> config = TRPOConfig(output_dir="runs/x", max_steps=50, max_kl=0.01)
    >>> config.cg_iters
    1
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from .actor_critic import double_backward_attention
from .config import RLConfig, _require
from .engine import RLTrainer, require_finite
from .metrics import UpdateCosine
from .profiling import PhaseTimer
from .rollout import Rollout, log_softmax_, token_logprobs
from .trust_region import (
    FVP_METHODS,
    DampedFisherProduct,
    GradientRMSPreconditioner,
    HeavyBallDirection,
    LinearizedLogits,
    LineSearchResult,
    MeasuredKLCurvature,
    TensorSignalShares,
    backtracking_line_search,
    cg_first_iterate,
    cg_solve,
    cross_fitted_gain_terms,
    flat_concat,
    flat_grad,
    forward_tangents,
    held_out_cg_iterations,
    kl_fisher_product,
    logit_fisher_quadratic,
    restore,
    set_to_step,
    snapshot,
    split_like,
    surrogate_gradient,
    token_trust_weights,
)

CG_STOPS = ("iterations", "held_out")
CG_PRECONDITIONERS = ("none", "gradient_rms")
FISHER_QUADRATICS = ("forward_mode", "product", "measured_kl")
MAX_KL_LIMIT = 1.0  # nats per token: a trust region beyond it bounds nothing the quadratic model can size
# No line search ran: g = 0 left no direction.
NO_STEP = LineSearchResult(accepted=False, step_frac=0.0, kl=0.0, surrogate_gain=0.0, iterations=0)


@dataclass
class TRPOConfig(RLConfig):
    """TRPO settings (Schulman et al. 2015, "Trust Region Policy Optimization", Appendix C).

    The update maximises the surrogate L(theta) = mean_t[ratio_t * A_t] subject to
    mean_t KL(pi_old || pi_theta) <= max_kl, over the policy LoRA tensors only. Where a default
    departs from the paper's, the reason is the scale of a LoRA Fisher; the measurements behind
    each choice are in the README ("Configuration" and "The cost of an update"):

    * ``cg_iters`` = 1, where the original TRPO code and SB3-contrib run 10: one CG iteration
      from x = 0 is the policy gradient, sized by the exact Fisher (1/2 s^T F s = delta) and
      line-searched on the exact KL. It needs the Fisher only as the quadratic s^T F s along its
      direction, with no Fisher-vector product (`fisher_quadratic`). More
      iterations buy more surrogate gain on the batch but less reward per nat of KL on held-out
      prompts: with far more LoRA parameters than sampled tokens,
      (F + cI)^-1 g fits the batch's noisy advantages, and stopping CG early regularises the solve.
    * ``cg_preconditioner`` = "gradient_rms": CG preconditioned by the running RMS of the gradient
      (Adam's second moment), so one iteration steps along P^-1 g. LoRA's B starts at zero, which
      makes A's gradient tiny; the plain gradient leaves A almost where it started, Adam does not.
    * ``fisher_chunks`` = 4: the gradient, each Fisher-vector product and the one-iteration
      quadratic run over 4 chunks of the batch's sequences, one chunk's graph (or logits) at a
      time, rather than one graph of the whole batch kept for every product: about a quarter of
      the memory, for one more forward and backward per chunk and product where CG runs more than
      one iteration.
    * ``fisher_quadratic`` = "measured_kl": s^T F s read off the exact KL, measured by one forward
      without a graph at the last update's step scale (the Fisher is the KL's Hessian at
      theta_old), rather than from forward-mode passes with tangents: the same reward at a
      fraction of the cost, and each step sized by the KL it will measure.
    * ``max_kl`` = 0.003 nats per token: on the exact task (docs/results.md) a step of 0.034 reaches
      2 nats from the reference in about 5 updates, so a KL budget of 0.25 holds one or two of them;
      at 0.003 the same 30 updates trace the frontier finely, and the best point within every
      budget from 0.25 to 2 nats is higher. Long completions spend it on every token: raise it for
      short runs.
    * ``cg_damping`` = 1e-3, not the classic 0.1: the Fisher of LoRA tensors is small, so a damping
      of 0.1 would dominate it and the step would realise a fraction of max_kl. The damping also
      keeps the system definite in the LoRA A-block, whose Fisher is zero at init (B = 0).
    * ``backtrack_coef`` = 0.8 (SB3-contrib) rather than the paper's 0.5: finer steps lose less of
      a good direction when the quadratic model overestimates.
    * ``accept_ratio`` = 0.1: a step must realise at least 10 % of the improvement predicted by
      the linear model (Schulman's ``linesearch``), as well as any improvement at all.
    * ``fvp_subsample`` = 1.0 (the paper used 10 %): the Fisher on the whole batch comes from the
      very forward that gives the gradient; lower it when memory, not step quality, is the limit.
    * ``fvp_method`` = "gauss_newton": F v = J^T M J v, one tangent pass and one backward per
      product, cheaper than the double backward of "kl_hessian" and the same matrix.
    """

    max_kl: float = field(
        default=0.003, metadata={"help": "delta: bound on the mean per-token KL(pi_old || pi_new) of one update."}
    )
    kl_tolerance: float = field(
        default=1.5, metadata={"help": "Accept a line-search point only if measured KL <= kl_tolerance * max_kl."}
    )
    cg_iters: int = field(
        default=1,
        metadata={
            "help": "Conjugate-gradient iterations (Fisher-vector products) per update. 1: the gradient, sized by the "
            "Fisher; 10: the classic TRPO solve, closer to the natural gradient."
        },
    )
    cg_stop: str = field(
        default="iterations",
        metadata={
            "help": "'iterations': run cg_iters CG iterations (or until cg_residual_tol). 'held_out': choose how many, "
            "up to cg_iters, on held-out sequences: CG on the gradient of the others, each iterate scored by the gain "
            "its trust-region step predicts on the held-out ones; then that many iterations on the whole batch's gradient."
        },
    )
    held_out_fraction: float = field(
        default=0.5, metadata={"help": "cg_stop='held_out': the fraction of the batch's sequences held out."}
    )
    cg_damping: float = field(default=1e-3, metadata={"help": "Damping c added to the Fisher: (F + c I) x = g."})
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
    logit_damping: float = field(
        default=0.0,
        metadata={
            "help": "lambda of the logit-space damping in the CG system (F + lambda J^T C J + cI) x = g (Gauss-Newton form only): "
            "a sampled token of probability p moves by about A/(p + lambda) in the logits instead of A/p. The step's "
            "length still comes from the Fisher alone. 0 is the exact natural gradient."
        },
    )
    cg_preconditioner: str = field(
        default="gradient_rms",
        metadata={
            "help": "'none': CG on (F + cI) x = g. 'gradient_rms': preconditioned CG with P = diag(sqrt(v) + 1e-8), v "
            "the running mean of g^2 over updates (Adam's second moment), so that one iteration steps along P^-1 g: "
            "every LoRA coordinate moves at its gradient's scale, A tensors as much as B. The step's length still "
            "comes from the exact Fisher."
        },
    )
    preconditioner_beta: float = field(
        default=0.999, metadata={"help": "cg_preconditioner='gradient_rms': the decay of the running mean of g^2."}
    )
    fisher_chunks: int = field(
        default=4,
        metadata={
            "help": "Passes the policy gradient, each Fisher-vector product and the one-iteration quadratic are split "
            "into, by sequences. 1: one pass over the batch, whose retained graph serves g and every product. N > 1: "
            "one chunk's graph at a time (about 1/N of the memory) for one more forward and backward per chunk and "
            "product."
        },
    )
    fisher_quadratic: str = field(
        default="measured_kl",
        metadata={
            "help": "How a one-iteration step forms z^T (F + cI) z, all of the Fisher it needs. 'forward_mode': J z from "
            "forward passes with tangents, no graph kept (the least memory). 'product': z^T (F z) from one "
            "Fisher-vector product, the form CG's later iterations use. 'measured_kl': 2 KL(a) / a^2 from the exact "
            "KL measured in one forward without a graph at theta_old + a z, a the scale of the last update's full "
            "step (the Fisher is the KL's Hessian at theta_old); the first update, with no scale yet, uses "
            "'forward_mode'."
        },
    )
    # 0.5: trust-region steps from one batch each are orthogonal from update to update (a random walk
    # in the LoRA tensors); carrying half of the last direction aligns them and buys reward per step,
    # with a frontier inside the seeds' spread of the plain step's (README, "TRPO vs PPO").
    momentum: float = field(
        default=0.5,
        metadata={
            "help": "mu of a heavy-ball direction across updates: CG solves (F + cI) x = m, m = g + mu * m_prev, so "
            "that one batch's gradient noise is averaged with the last few batches' (Polyak 1964; the momentum of "
            "K-FAC, Martens & Grosse 2015, Sec. 7). The step's length and the line search are unchanged; where "
            "g^T m <= 0, m restarts at g. 0: each update from its own batch alone, as in the paper."
        },
    )
    max_token_kl: float | None = field(
        default=None,
        metadata={
            "help": "kappa of a per-token trust region beside the mean one (token-level trust regions: TROLL, "
            "arXiv 2510.03817): the one-iteration step's full length is measured token by token, and each token whose "
            "KL(pi_old || pi_new) there exceeds kappa has its advantage scaled by sqrt(kappa / KL_t) in a second "
            "gradient pass, whose direction the step then takes (sized and line-searched on the mean KL as always). "
            "Costs that forward and the second gradient pass. None: the mean KL alone, as in the paper."
        },
    )
    signal_shrinkage: bool = field(
        default=False,
        metadata={
            "help": "Scale each LoRA tensor's part of the one-iteration step by rho_k in [0, 1], the running share "
            "of its predicted gain that is signal (cross-fitted over the fisher_chunks chunks of each batch, "
            "`TensorSignalShares`): the Wiener shrinkage of a noisy step, so that the trust region's KL goes where "
            "the batch's gradient is signal. The step's length still comes from the Fisher. Needs fisher_chunks >= 2 "
            "and a one-iteration solve."
        },
    )
    signal_shrinkage_beta: float = field(
        default=0.9, metadata={"help": "signal_shrinkage: the decay of the per-tensor gains' running means."}
    )
    fvp_method: str = field(
        default="gauss_newton",
        metadata={
            "help": "How F v is computed where CG runs more than one iteration (one needs no product): 'gauss_newton' "
            "(J^T M J v, two passes over one retained graph) or 'kl_hessian' (double backward through the KL "
            "gradient). Both are the exact Fisher at theta_old."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            0 < self.max_kl <= MAX_KL_LIMIT,
            f"max_kl={self.max_kl} must be in (0, {MAX_KL_LIMIT}] nats per token, e.g. --max_kl 0.01: the quadratic "
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
            self.cg_stop in CG_STOPS, f"cg_stop={self.cg_stop!r} is not one of {CG_STOPS}; e.g. --cg_stop held_out."
        )
        _require(
            self.cg_stop != "held_out" or self.batch_size >= 2,
            f"cg_stop='held_out' holds out sequences of each batch: batch_size={self.batch_size} must be >= 2.",
        )
        _require(
            self.cg_stop != "held_out" or self.kl_penalty == "reward",
            f"cg_stop='held_out' scores CG's iterates on the surrogate of held-out sequences, and "
            f"kl_penalty={self.kl_penalty!r} puts a KL term of every sequence in it: use kl_penalty 'reward' with "
            "it, or cg_stop 'iterations'.",
        )
        _require(
            0.0 < self.held_out_fraction < 1.0,
            f"held_out_fraction={self.held_out_fraction} must lie strictly between 0 and 1, e.g. 0.5.",
        )
        _require(
            self.fisher_chunks >= 1,
            f"fisher_chunks={self.fisher_chunks} must be >= 1 (1: one pass over the batch), e.g. --fisher_chunks 4.",
        )
        _require(
            self.cg_preconditioner in CG_PRECONDITIONERS,
            f"cg_preconditioner={self.cg_preconditioner!r} is not one of {CG_PRECONDITIONERS}; "
            "e.g. --cg_preconditioner gradient_rms.",
        )
        _require(
            0.0 < self.preconditioner_beta < 1.0,
            f"preconditioner_beta={self.preconditioner_beta} must lie strictly between 0 and 1, e.g. 0.999.",
        )
        _require(
            self.fisher_quadratic in FISHER_QUADRATICS,
            f"fisher_quadratic={self.fisher_quadratic!r} is not one of {FISHER_QUADRATICS}; e.g. --fisher_quadratic product.",
        )
        _require(
            0.0 <= self.momentum < 1.0, f"momentum={self.momentum} must lie in [0, 1), e.g. --momentum 0.8 (0: none)."
        )
        _require(
            self.logit_damping >= 0, f"logit_damping={self.logit_damping} must be >= 0 (0: the exact natural gradient)."
        )
        _require(
            self.max_token_kl is None or self.max_token_kl > 0,
            f"max_token_kl={self.max_token_kl} must be a positive number of nats, e.g. --max_token_kl 0.3 (None: off).",
        )
        _require(
            self.max_token_kl is None or not self.needs_fisher_products,
            f"max_token_kl={self.max_token_kl} reweights the one-iteration step's gradient: it needs cg_iters 1, "
            f"cg_stop 'iterations' and fisher_quadratic 'measured_kl' or 'forward_mode' (got cg_iters={self.cg_iters}, "
            f"cg_stop={self.cg_stop!r}, fisher_quadratic={self.fisher_quadratic!r}).",
        )
        _require(
            not self.signal_shrinkage or (self.fisher_chunks >= 2 and self.batch_size >= 2),
            f"signal_shrinkage cross-fits the gradients of fisher_chunks chunks of each batch: it needs "
            f"fisher_chunks >= 2 and batch_size >= 2 (got {self.fisher_chunks} and {self.batch_size}), e.g. "
            "--fisher_chunks 4.",
        )
        _require(
            not self.signal_shrinkage or (not self.needs_fisher_products and self.max_token_kl is None),
            f"signal_shrinkage scales the one-iteration step along the batch's own gradient: it needs cg_iters 1, "
            f"cg_stop 'iterations', fisher_quadratic 'measured_kl' or 'forward_mode' and no max_token_kl (got "
            f"cg_iters={self.cg_iters}, cg_stop={self.cg_stop!r}, fisher_quadratic={self.fisher_quadratic!r}, "
            f"max_token_kl={self.max_token_kl}).",
        )
        _require(
            0.0 <= self.signal_shrinkage_beta < 1.0,
            f"signal_shrinkage_beta={self.signal_shrinkage_beta} must lie in [0, 1), e.g. 0.9.",
        )
        _require(
            self.logit_damping == 0 or self.fvp_method == "gauss_newton",
            f"logit_damping={self.logit_damping} needs fvp_method='gauss_newton' (got {self.fvp_method!r}).",
        )

    @property
    def needs_fisher_products(self) -> bool:
        """Whether an update forms Fisher-vector products F v: for CG beyond its first iteration,
        for choosing the iterations on held-out sequences, or to size the one-iteration step with
        `fisher_quadratic` 'product'. Otherwise the step needs only forward-mode passes."""
        return self.cg_iters > 1 or self.cg_stop == "held_out" or self.fisher_quadratic == "product"

    @property
    def sizes_step_by_measured_kl(self) -> bool:
        """Whether the one-iteration step takes z^T F z from the measured KL (`fisher_quadratic`
        'measured_kl' on a solve that forms no products)."""
        return self.fisher_quadratic == "measured_kl" and not self.needs_fisher_products


class ChunkedGradient(NamedTuple):
    grad: torch.Tensor  # g, averaged across processes
    surrogate_old: float  # L(theta_old), averaged across processes
    logp_all_old: torch.Tensor  # log pi_old over the vocabulary [B, T, V], this process's
    held_out_grad: torch.Tensor | None  # the held-out batch's g, averaged across processes
    chunk_grads: torch.Tensor  # [J, n] this process's chunks' token-share-weighted gradients, summing to its g
    chunk_shares: torch.Tensor  # [J] their shares of its valid tokens


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
        self.heavy_ball = HeavyBallDirection(config.momentum) if config.momentum > 0 else None
        self.preconditioner = (
            GradientRMSPreconditioner(config.preconditioner_beta)
            if config.cg_preconditioner == "gradient_rms"
            else None
        )
        self.measured_curvature = MeasuredKLCurvature() if config.sizes_step_by_measured_kl else None
        self.signal_shares = TensorSignalShares(config.signal_shrinkage_beta) if config.signal_shrinkage else None

    def _check_shardable(self) -> None:
        cfg = self.config
        if cfg.needs_fisher_products:
            raise ValueError(
                f"cg_iters={cfg.cg_iters}, cg_stop={cfg.cg_stop!r}, fisher_quadratic={cfg.fisher_quadratic!r} with the frozen base "
                "sharded (fsdp.yaml, deepspeed_zero3.yaml): Fisher-vector products run several backward passes over "
                "one forward's graph, whose gathered layer weights the sharding frees after the first. "
                "Use cg_iters 1 with fisher_quadratic 'measured_kl' or 'forward_mode' (no product; the defaults) or "
                "recipes/accelerate_configs/multi_gpu.yaml."
            )

    def optimizers(
        self,
    ) -> dict[
        str,
        torch.optim.Optimizer
        | UpdateCosine
        | HeavyBallDirection
        | GradientRMSPreconditioner
        | MeasuredKLCurvature
        | TensorSignalShares,
    ]:
        """The optimizers' state and the solver's own state across updates, by name."""
        extra = {
            "policy_momentum": self.heavy_ball,
            "policy_preconditioner": self.preconditioner,
            "policy_step_scale": self.measured_curvature,
            "policy_signal_shares": self.signal_shares,
        }
        return super().optimizers() | {name: state for name, state in extra.items() if state is not None}

    def fisher_batch(self, batch: Rollout, config: TRPOConfig | None = None) -> Rollout:
        """The sequences the Fisher is estimated on: `fvp_subsample` of the batch, drawn from the
        minibatch generator (the whole batch itself at 1.0)."""
        n = max(1, round((config or self.config).fvp_subsample * len(batch)))
        if n == len(batch):
            return batch
        return batch.select(torch.randperm(len(batch), generator=self.minibatch_generator)[:n])

    def held_out_batch(self, batch: Rollout, config: TRPOConfig | None = None) -> Rollout:
        """`batch` with the advantages of all but a random `held_out_fraction` of its sequences set
        to 0, so that its surrogate is the held-out sequences' share of the batch's surrogate."""
        n = len(batch)
        held = max(1, min(n - 1, round((config or self.config).held_out_fraction * n)))
        chosen = torch.randperm(n, generator=self.minibatch_generator)[:held].to(batch.advantages.device)
        keep = torch.zeros(n, dtype=batch.advantages.dtype, device=batch.advantages.device).index_fill_(0, chosen, 1.0)
        return dataclasses.replace(batch, advantages=batch.advantages * keep.unsqueeze(1))

    def fisher_logits(self, batch: Rollout) -> torch.Tensor:
        """The policy's logits with a graph, attention on the double-backward-capable path (both
        Fisher forms differentiate a gradient; the fused kernels cannot)."""
        with double_backward_attention(self.actor_critic.peft_model):
            return self.policy_logits(batch)

    def fisher_product(
        self,
        batch: Rollout,
        logits: torch.Tensor | None = None,
        jacobian: LinearizedLogits | None = None,
        config: TRPOConfig | None = None,
    ) -> DampedFisherProduct:
        """v -> (F + cI) v over the policy LoRA tensors, F the Fisher of the mean per-token KL at
        theta_old on `batch` (`logits` from `fisher_logits(batch)` when already computed, and a
        `jacobian` already built on them are reused), averaged across processes; `config` the
        solver settings (default: the trainer's)."""
        cfg = config or self.config
        if logits is None and cfg.fisher_chunks > 1:
            return self.chunked_fisher_product(batch, cfg)
        logits = self.fisher_logits(batch) if logits is None else logits
        return kl_fisher_product(
            logits,
            batch.response_mask,
            self.actor_critic.policy_parameters(),
            method=cfg.fvp_method,
            damping=cfg.cg_damping,
            logit_damping=cfg.logit_damping,
            reduce=self.reduce_mean,
            jacobian=jacobian,
        )

    @staticmethod
    def sequence_chunks(batch: Rollout, chunks: int) -> list[tuple[Rollout, torch.Tensor]]:
        """`batch` split into `chunks` runs of sequences (fewer for a smaller batch), each with its
        share of the batch's valid tokens."""
        total = batch.response_mask.sum().clamp(min=1)
        parts = [batch.select(index) for index in torch.arange(len(batch)).chunk(chunks)]
        return [(part, part.response_mask.sum() / total) for part in parts]

    def chunked_gradient(self, batch: Rollout, chunks: int, held_out: Rollout | None = None) -> ChunkedGradient:
        """g, L(theta_old), log pi_old over the vocabulary and the `held_out` batch's g (or None) from
        one forward and backward per chunk (two backwards with `held_out`), no graph kept past its
        chunk: the surrogate is a token mean, so g is the token-share-weighted sum of the chunks'
        gradients, which come back too (this process's). `held_out` is `batch` with other
        advantages, so it shares each chunk's forward."""
        params = self.actor_critic.policy_parameters()
        grads, shares, held_out_grads, surrogates, logp_all_old = [], [], [], [], []
        held_out_chunks = self.sequence_chunks(held_out, chunks) if held_out is not None else None
        for i, (chunk, share) in enumerate(self.sequence_chunks(batch, chunks)):
            logits = self.policy_logits(chunk)
            logprobs = token_logprobs(logits, chunk.response_ids)
            logp_all = torch.log_softmax(logits, dim=-1) if self.needs_vocabulary_log_probs(chunk) else None
            if held_out_chunks is not None:
                held_out_chunk, _ = held_out_chunks[i]
                held_out_surrogate = share * self.surrogate(held_out_chunk, logprobs, logp_all)
                held_out_grads.append(flat_grad(held_out_surrogate, params, retain_graph=True))
            surrogate = share * self.surrogate(chunk, logprobs, logp_all)
            grads.append(flat_grad(surrogate, params))
            shares.append(share)
            surrogates.append(surrogate.detach())
            logp_all_old.append(log_softmax_(logits.detach()))
            del logits, logprobs, logp_all, surrogate
        chunk_grads = torch.stack(grads)
        held_out_grad = self.reduce_mean(torch.stack(held_out_grads).sum(dim=0)) if held_out_grads else None
        return ChunkedGradient(
            grad=self.reduce_mean(chunk_grads.sum(dim=0)),
            surrogate_old=self.reduce_mean(torch.stack(surrogates).sum()).item(),
            logp_all_old=torch.cat(logp_all_old),
            held_out_grad=held_out_grad,
            chunk_grads=chunk_grads,
            chunk_shares=torch.stack(shares),
        )

    def chunked_fisher_product(self, batch: Rollout, cfg: TRPOConfig) -> DampedFisherProduct:
        """(F + cI) v with F the token-share-weighted sum of the chunks' Fishers (the KL is a token
        mean too), each product rebuilding one chunk's graph at a time: the memory of one chunk's
        graph, for one more forward and backward per chunk and product."""
        params = self.actor_critic.policy_parameters()
        chunks = self.sequence_chunks(batch, cfg.fisher_chunks)

        def over_chunks(apply: Callable[[DampedFisherProduct], torch.Tensor]) -> torch.Tensor:
            total = None
            for chunk, share in chunks:
                product = kl_fisher_product(
                    self.fisher_logits(chunk),
                    chunk.response_mask,
                    params,
                    method=cfg.fvp_method,
                    damping=0.0,
                    logit_damping=cfg.logit_damping,
                )
                part = share * apply(product)
                total = part if total is None else total + part
                del product
            return total

        def logit_quadratic(x: torch.Tensor) -> torch.Tensor:
            return over_chunks(lambda product: product.local_logit_quadratic(x))

        return DampedFisherProduct(
            lambda v: over_chunks(lambda product: product.fisher_product(v).float()),
            cfg.cg_damping,
            self.reduce_mean,
            logit_quadratic if cfg.logit_damping else None,
        )

    def fisher_quadratic(self, batch: Rollout, x: torch.Tensor, config: TRPOConfig | None = None) -> float:
        """x^T (F + cI) x over the policy LoRA tensors, F the Fisher of the mean per-token KL on
        `batch`, averaged across processes: from forward-mode passes (J x with the logits, one
        `fisher_chunks` chunk at a time, no graph kept), which is all the Fisher a one-iteration
        step needs (`cg_first_iterate`): no backward at all, where a product costs three."""
        cfg = config or self.config
        params = self.actor_critic.policy_parameters()
        total = batch.response_mask.sum().clamp(min=1)
        quadratic = torch.zeros((), device=x.device)
        model = self.actor_critic.peft_model
        for chunk, _ in self.sequence_chunks(batch, cfg.fisher_chunks):
            # Forward-mode AD has no rule for the fused attention kernels; the math path has one.
            with torch.no_grad(), double_backward_attention(model), forward_tangents(model, params, x):
                logits, tangent = forward_ad.unpack_dual(self.policy_logits(chunk))
                quadratic = quadratic + logit_fisher_quadratic(logits, tangent, chunk.response_mask / total)
            del logits, tangent
        return self.reduce_mean(quadratic).item() + cfg.cg_damping * torch.dot(x, x).item()

    @torch.no_grad()
    def measured_kl_along(self, batch: Rollout, logp_all_old: torch.Tensor, z: torch.Tensor, scale: float) -> float:
        """The measured mean KL(pi_old || pi_theta) on `batch` at theta = theta_old + scale * z, from one
        forward without a graph; the policy is restored bitwise after."""
        return self._at_step(z, scale, lambda: self.measure_policy_change(batch, logp_all_old)[1])

    @torch.no_grad()
    def token_kl_along(self, batch: Rollout, logp_all_old: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
        """`token_kl` on `batch` at theta = theta_old + scale * z ([B, T], this process's), from one
        forward without a graph; the policy is restored bitwise after."""
        return self._at_step(z, scale, lambda: self.token_kl(batch, logp_all_old))

    def _at_step(self, z: torch.Tensor, scale: float, measure: Callable[[], object]):
        params = self.actor_critic.policy_parameters()
        origin = snapshot(params)
        try:
            set_to_step(params, origin, z, scale)
            return measure()
        finally:
            restore(params, origin)

    def one_iteration_quadratic(
        self,
        batch: Rollout,
        fisher_batch: Rollout,
        logp_all_old: torch.Tensor,
        z: torch.Tensor,
        cfg: TRPOConfig,
        curvature: MeasuredKLCurvature | None,
    ) -> tuple[float, int]:
        """(z^T (F + cI) z, KL probes taken) for a one-iteration step along z: from the measured KL
        where `curvature` has a scale, else from forward-mode passes (`fisher_quadratic`)."""
        z_fz, probes = None, 0
        if curvature is not None:
            z_fz, probes = curvature(lambda scale: self.measured_kl_along(batch, logp_all_old, z, scale), cfg.max_kl)
        if z_fz is None:
            return self.fisher_quadratic(fisher_batch, z, cfg), probes
        return z_fz + cfg.cg_damping * torch.dot(z, z).item(), probes

    def token_trust_region_gradient(
        self,
        batch: Rollout,
        fisher_batch: Rollout,
        logp_all_old: torch.Tensor,
        grad: torch.Tensor,
        heavy_ball: HeavyBallDirection | None,
        precondition: GradientRMSPreconditioner | None,
        curvature: MeasuredKLCurvature | None,
        cfg: TRPOConfig,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(the gradient the step follows, stats) under `max_token_kl`: the one-iteration step along
        `grad`'s direction is sized as usual, its per-token KL measured at its full length, and,
        where a token exceeds the cap on any process, g is taken again with `token_trust_weights` on
        the advantages. A sampled token's surrogate term ratio_t * A_t is one sample's estimate, and
        the mean-KL region lets a few high-|A| tokens move far on it while most barely move; PPO's
        clipping stops those tokens' gradient, this scales it back to the cap."""
        direction = heavy_ball.peek(grad) if heavy_ball is not None else grad
        z = precondition(direction) if precondition is not None else direction
        z_az, probes = self.one_iteration_quadratic(batch, fisher_batch, logp_all_old, z, cfg, curvature)
        if not z_az > 0:  # g = 0 (e.g. all advantages equal): no step to measure, none will be taken
            return grad, {"trpo/token_kl_max": 0.0, "trpo/capped_tokens": 0.0, "trpo/token_kl_probes": float(probes)}
        mask = batch.response_mask
        token_kl = self.token_kl_along(batch, logp_all_old, z, math.sqrt(2 * cfg.max_kl / z_az))
        weights = token_trust_weights(token_kl, mask, cfg.max_token_kl)
        capped = self.reduce_mean(((weights < 1).float() * mask).sum() / mask.sum().clamp(min=1)).item()
        stats = {
            "trpo/token_kl_max": self.reduce_mean((token_kl * mask).max()).item(),
            "trpo/capped_tokens": capped,
            "trpo/token_kl_probes": float(probes + 1),
        }
        if capped == 0:
            return grad, stats
        weighted = dataclasses.replace(batch, advantages=batch.advantages * weights)
        followed = self.chunked_gradient(weighted, cfg.fisher_chunks).grad
        require_finite("token-capped policy gradient", followed)
        return followed, stats

    def policy_update(self, batch: Rollout, config: TRPOConfig | None = None) -> dict[str, float]:
        """One TRPO step (Schulman et al. 2015, Appendix C):

        1. g = grad L(theta_old), L = mean_t exp(logp_theta - logp_old) * A_t;
        2. x ~ (F + cI)^-1 m by CG (preconditioned with `cg_preconditioner`), m = g (g + mu * m_prev
           with `momentum`), F v = J^T M J v (or by double backprop) over one graph built once: the
           very forward g came from when the Fisher uses the whole batch (`fisher_chunks` = 1). At
           one iteration x is along z = P^-1 m and only z^T F z is needed: forward-mode J z, no product
           (or, with `fisher_quadratic` 'measured_kl', 2 KL / a^2 from the exact KL measured at a z;
           with `signal_shrinkage`, z scaled per LoRA tensor by its running signal share);
        3. full step s = sqrt(2 delta / x^T F x) x, so that 1/2 s^T F s = delta;
        4. backtracking on the measured exact KL and the surrogate; exact restore on failure.

        With the gradient in chunks, the step's direction is also cross-fitted over them
        (`trpo/cross_fitted_gain_ratio`, the share of its predicted gain that is signal).

        `config` gives this update other solver settings than the trainer's (e.g. to probe a
        variant on the same batch, `recipes/step_quality.py`).
        """
        cfg = config or self.config
        params = self.actor_critic.policy_parameters()
        timer = PhaseTimer()

        fisher_batch = self.fisher_batch(batch, cfg)
        held_out = self.held_out_batch(batch, cfg) if cfg.cg_stop == "held_out" else None
        # One CG iteration needs only the quadratic z^T F z of its direction, which forward-mode
        # passes give (`fisher_quadratic`); more iterations, or choosing them, need products F v.
        products = cfg.needs_fisher_products
        # With the Fisher's products on the whole batch in one pass, one forward serves g and F
        # (`surrogate_gradient`).
        shared_forward = products and fisher_batch is batch and cfg.fisher_chunks == 1
        logits = jacobian = None
        with timer("gradient"):
            if cfg.fisher_chunks > 1:
                chunked = self.chunked_gradient(batch, cfg.fisher_chunks, held_out)
                grad, surrogate_old, logp_all_old = chunked.grad, chunked.surrogate_old, chunked.logp_all_old
                held_out_grad = chunked.held_out_grad
            else:
                logits = self.fisher_logits(batch) if shared_forward else self.policy_logits(batch)
                logprobs = token_logprobs(logits, batch.response_ids)
                logp_all = torch.log_softmax(logits, dim=-1) if self.needs_vocabulary_log_probs(batch) else None
                surrogate = self.surrogate(batch, logprobs, logp_all)
                surrogate_old = self.reduce_mean(surrogate.detach()).item()
                if held_out is not None:
                    # The held-out sequences' share of the surrogate: one more backward, kept graph.
                    held_out_grad = self.reduce_mean(
                        flat_grad(self.surrogate(held_out, logprobs, logp_all), params, retain_graph=True)
                    )
                del logprobs, logp_all
                grad, jacobian = surrogate_gradient(
                    surrogate,
                    logits,
                    params,
                    linearize=shared_forward and cfg.fvp_method == "gauss_newton",
                    retain_graph=shared_forward,
                )
                grad = self.reduce_mean(grad)
                del surrogate
        require_finite("policy gradient", grad)
        # The heavy ball and the preconditioner carry the run's state across updates: a probe with
        # its own `config` (step_quality.py) sees them as the run's update would, on copies.
        heavy_ball = self.heavy_ball if config is None else copy.deepcopy(self.heavy_ball)
        precondition = self.cg_preconditioner(cfg)
        prior_precondition = None
        if precondition is not None:
            precondition = precondition if config is None else copy.deepcopy(precondition)
            # The state before this batch, from which the cross-fit remakes the step on part of it.
            prior_precondition = copy.deepcopy(precondition) if cfg.fisher_chunks > 1 else None
            precondition.update(grad)

        with timer("fvp_graph"):
            fvp = (
                self.fisher_product(fisher_batch, logits if shared_forward else None, jacobian, cfg)
                if products
                else None
            )
            del jacobian
            if logits is not None:
                # pi_old over the vocabulary, for the line-search KL: the gradient's own logits, turned
                # into log-probs in place once the Fisher has taken its probabilities from them (no
                # second forward, no copy; nothing left in any graph reads these values).
                logp_all_old = log_softmax_(logits.detach())
                del logits

        curvature = None
        if cfg.sizes_step_by_measured_kl:
            # A probe with its own `config` works on a copy of the run's scale, or, where the run
            # keeps none, starts without one (forward mode).
            curvature = self.measured_curvature if config is None else copy.deepcopy(self.measured_curvature)
            curvature = curvature if curvature is not None else MeasuredKLCurvature()
        followed, token_stats = grad, {}
        if cfg.max_token_kl is not None:
            with timer("token_trust_region"):
                followed, token_stats = self.token_trust_region_gradient(
                    batch, fisher_batch, logp_all_old, grad, heavy_ball, precondition, curvature, cfg
                )
        tensor_weights, noise_stats = None, {}
        if cfg.fisher_chunks > 1 and len(chunked.chunk_grads) > 1 and followed is grad:
            # Before the heavy ball takes this batch's gradient: the cross-fit remakes its step.
            tensor_weights, noise_stats = self.cross_fit(cfg, config, chunked, heavy_ball, prior_precondition)
        direction = heavy_ball(followed) if heavy_ball is not None else followed
        z = None
        kl_probes = 0
        with timer("cg"):
            # The tolerance is relative: LoRA gradients can be far smaller than any absolute one.
            direction_sq = torch.dot(direction, direction).item()
            if fvp is None:
                # x = (m.z / z^T (F + cI) z) z, z = P^-1 m: CG's first iterate. A logit damping
                # changes only the length of z, which the trust region sets again below.
                z = direction if precondition is None else precondition(direction)
                if tensor_weights is not None:
                    z = z * self.per_coordinate(tensor_weights)
                z_az, kl_probes = self.one_iteration_quadratic(batch, fisher_batch, logp_all_old, z, cfg, curvature)
                cg = cg_first_iterate(direction, z, z_az)
                x_fx = cg.x_ax
            else:
                cg_iters = cfg.cg_iters
                if held_out is not None:
                    fit_grad = grad - held_out_grad
                    cg_iters, _ = held_out_cg_iterations(
                        fvp,
                        fit_grad,
                        held_out_grad,
                        cfg.cg_iters,
                        cfg.cg_residual_tol * torch.dot(fit_grad, fit_grad).item(),
                        precondition=precondition,
                    )
                cg = cg_solve(fvp, direction, cg_iters, cfg.cg_residual_tol * direction_sq, precondition=precondition)
                # x^T (F + cI) x = x^T (g - r): CG's own residual saves the product an explicit x^T F x
                # would cost; a logit damping's share is taken out (one J x pass), since the step's
                # length is set by the KL alone.
                x_fx = cg.x_ax - fvp.logit_quadratic(cg.x)
        require_finite("CG solution", cg.x, torch.tensor(x_fx))
        fvp_calls = fvp.calls if fvp is not None else 0
        del fvp  # free the Fisher graph before the line search

        stats = {
            "trpo/grad_norm": grad.norm().item(),
            "trpo/cg_residual": cg.residual / direction_sq if direction_sq > 0 else 0.0,
            "trpo/cg_iters": float(cg.iterations),
            "trpo/fvp_count": float(fvp_calls),
            "trpo/kl_probes": float(kl_probes),
            "trpo/surrogate_old": surrogate_old,
            **token_stats,
            **noise_stats,
        }
        if not x_fx > 0:
            # g = 0 (e.g. all advantages equal): no direction to take.
            return stats | self._step_stats(cfg, timer, NO_STEP, expected_gain=0.0, full_step_norm=torch.zeros(()))

        full_step = math.sqrt(2 * cfg.max_kl / x_fx) * cg.x
        require_finite("step", full_step)
        expected_gain = torch.dot(grad, full_step).item()
        if curvature is not None:
            curvature.record((full_step.norm() / z.norm()).item())

        with timer("line_search"):
            result = backtracking_line_search(
                params,
                full_step,
                expected_gain,
                lambda: self.measure_policy_change(batch, logp_all_old),
                max_kl=cfg.max_kl,
                kl_tolerance=cfg.kl_tolerance,
                backtrack_coef=cfg.backtrack_coef,
                max_backtracks=cfg.line_search_steps,
                accept_ratio=cfg.accept_ratio,
            )
        return stats | self._step_stats(cfg, timer, result, expected_gain, full_step.norm())

    def cg_preconditioner(self, cfg: TRPOConfig) -> GradientRMSPreconditioner | None:
        if cfg.cg_preconditioner == "none":
            return None
        if self.preconditioner is None:
            raise ValueError(
                f"cg_preconditioner={cfg.cg_preconditioner!r} needs the running state of a trainer built with it; "
                f"this one has cg_preconditioner={self.config.cg_preconditioner!r}."
            )
        return self.preconditioner

    def cross_fitted_tensor_gains(
        self,
        chunked: ChunkedGradient,
        heavy_ball: HeavyBallDirection | None,
        prior_precondition: GradientRMSPreconditioner | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per policy LoRA tensor, the (cross-fitted, in-sample) first-order gain
        (`cross_fitted_gain_terms`) of the one-iteration step's direction z = P^-1 m, the heavy
        ball's m and the preconditioner's P (from its state before this batch) remade from each
        gradient estimate. Each process cross-fits its own chunks against its own gradient
        (unbiased on each, so their mean is too); both are averaged across processes."""

        def step_direction(g: torch.Tensor) -> torch.Tensor:
            m = heavy_ball.peek(g) if heavy_ball is not None else g
            return prior_precondition.updated(g)(m) if prior_precondition is not None else m

        terms = cross_fitted_gain_terms(chunked.chunk_grads, chunked.chunk_shares, step_direction)
        params = self.actor_critic.policy_parameters()
        per_tensor = torch.stack([torch.stack([part.sum() for part in split_like(t, params)]) for t in terms])
        cross_fitted, in_sample = self.reduce_mean(per_tensor)
        return cross_fitted, in_sample

    def cross_fit(
        self,
        cfg: TRPOConfig,
        config: TRPOConfig | None,
        chunked: ChunkedGradient,
        heavy_ball: HeavyBallDirection | None,
        prior_precondition: GradientRMSPreconditioner | None,
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(the per-tensor weights of this step under `signal_shrinkage`, else None; its stats): the
        cross-fitted share of the step's predicted gain, and under `signal_shrinkage` the batch's
        per-tensor gains recorded for the next steps (a probe with its own `config` on a copy)."""
        cross_fitted, in_sample = self.cross_fitted_tensor_gains(chunked, heavy_ball, prior_precondition)
        tensor_weights, stats = None, {}
        if cfg.signal_shrinkage:
            if self.signal_shares is None:
                raise ValueError(
                    "signal_shrinkage needs the running shares of a trainer built with it; this one has "
                    f"signal_shrinkage={self.config.signal_shrinkage}."
                )
            signal_shares = self.signal_shares if config is None else copy.deepcopy(self.signal_shares)
            # From the batches before this one, so that the step's weights do not fit its own noise.
            tensor_weights = signal_shares.weights()
            signal_shares.record(cross_fitted, in_sample)
            stats["trpo/signal_shrinkage_mean"] = tensor_weights.mean().item() if tensor_weights is not None else 1.0
        weights = tensor_weights if tensor_weights is not None else torch.ones_like(in_sample)
        step_in_sample = torch.dot(weights, in_sample).item()
        stats["trpo/cross_fitted_gain_ratio"] = (
            torch.dot(weights, cross_fitted).item() / step_in_sample if step_in_sample > 0 else 0.0
        )
        return tensor_weights, stats

    def per_coordinate(self, tensor_values: torch.Tensor) -> torch.Tensor:
        """One value per policy LoRA tensor, repeated over its coordinates (the flat order of g)."""
        return flat_concat(
            [value.expand_as(p) for value, p in zip(tensor_values, self.actor_critic.policy_parameters())]
        )

    @staticmethod
    def _step_stats(
        cfg: TRPOConfig, timer: PhaseTimer, result: LineSearchResult, expected_gain: float, full_step_norm: torch.Tensor
    ) -> dict[str, float]:
        """The line search's outcome; a rejected step reports zeros and the full step's expected gain."""
        frac = result.step_frac if result.accepted else 1.0
        return {
            "trpo/accepted": float(result.accepted),
            "trpo/kl": result.kl,
            # KL(pi_old || pi_old + a s) ~ a^2 * 1/2 s^T F s = a^2 * delta to second order, so a correct Fisher predicts it.
            "trpo/kl_predicted": cfg.max_kl * result.step_frac**2,
            "trpo/step_frac": result.step_frac,
            "trpo/surrogate_gain": result.surrogate_gain,
            "trpo/expected_gain": expected_gain * frac,
            "trpo/line_search_iters": float(result.iterations),
            "trpo/step_norm": (full_step_norm * result.step_frac).item(),
            **{f"time/policy_{k}": v for k, v in timer.seconds.items()},
        }

    def _progress_fields(self, stats: dict[str, float]) -> dict[str, str]:
        if "trpo/kl" not in stats:  # a step rejected for a non-finite value
            return {"nonfinite": "rejected"}
        return {"trpo_kl": f"{stats['trpo/kl']:.4f}", "acc": f"{int(stats['trpo/accepted'])}"}
