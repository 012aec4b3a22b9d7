"""Scaling laws: compute-optimal size, the Chinchilla loss fit, and the tokens-per-parameter checks.

Sources:
* Hoffmann et al. 2022 ("Chinchilla", arXiv 2203.15556): ~20 training tokens per parameter is
  compute-optimal -- Approaches 1 and 2 (Table 3 lists Approach 1's: 1B on 20.2B tokens, 67B on 1.5T, 175B on
  3.7T), and C ~= 6ND. The IsoFLOP minimum is flat (their Fig. 3): a model off it by 2x in N/D loses little.
* Approach-3 parametric fit L(N, D) = E + A/N^alpha + B/D^beta with E=1.69, A=406.4, B=410.7,
  alpha=0.34, beta=0.28 (Hoffmann et al. 2022, eq. 10). Minimised under C = 6ND (:meth:`LossFit.optimum`)
  these published constants give far more than 20 tokens/param, and more the larger the compute (the report
  states the figure at the run's compute, ``ComputeNumbers.approach3_tokens_per_param``) -- the inconsistency
  Besiroglu et al. 2024 (Epoch AI, "Chinchilla Scaling: A replication attempt", arXiv 2404.10102) traced to
  the fit; their refit E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658 agrees with
  Approaches 1-2 (~20 tokens/param). llmc uses the 20x rule for "optimal N/D" and the refit for the
  predicted losses (:func:`predicted_losses`): nats/token on the fits' data (MassiveText with its
  SentencePiece tokenizer), for comparing N/D trade-offs of one run, not an absolute prediction for other
  data or tokenizers.
* For MoE models N is the *active* parameter count (the parameters a token's FLOPs scale with). The 20x rule
  and the loss fits were measured on dense models; applied to an MoE's active parameters they are a dense-model
  heuristic: no MoE scaling law (e.g. Clark et al. 2022, arXiv 2202.01169; Krajewski et al. 2024,
  arXiv 2402.07871) is applied, and at equal active parameters an MoE reaches lower loss than the dense fit says.
* Data-limited runs: Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", arXiv 2305.16264)
  find up to ~4 epochs of repeated data almost as good as new data, and with the data fixed, extra compute
  better spent on more epochs than on more parameters. When every source declares its tokens (the unique
  tokens U) and the compute-optimal D exceeds ``MAX_EPOCHS`` epochs of U, the compute-optimal advice says so
  (:func:`data_limit_note`) instead of recommending a larger model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from llmc.compiler.checks import MAX_EPOCHS
from llmc.diagnostics import Diagnostic

TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022 Approaches 1-2 (Table 3)
OVERTRAINED_FACTOR = 10.0  # C002 fires above 10x the 20 tok/param optimum, i.e. > 200 tok/param
# C001 is a warning below half the 20 tok/param optimum (10 tok/param) and an info between that and 20: the
# IsoFLOP minimum is flat (Hoffmann et al. 2022 Fig. 3); under the refit below, at 10 tok/param an 8B-scale
# model loses ~0.003 nats/token against the compute-optimal N, D for its compute
UNDERTRAINED_WARN_FACTOR = 0.5


@dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A / N**alpha + B / D**beta (Hoffmann et al. 2022 eq. 10)."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / float(n_params) ** self.alpha + self.B / float(tokens) ** self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """argmin_N L(N, C/(6N)) in closed form: N = G*(C/6)^(beta/(alpha+beta)),
        G = (alpha*A / (beta*B))^(1/(alpha+beta)) (Hoffmann et al. 2022 eq. 4)."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = G * (flops / 6.0) ** (b / (a + b))
        return n, flops / (6.0 * n)


# the smallest model of the fits' data (Hoffmann et al. 2022: "over 400 language models ranging from 70 million to
# over 16 billion parameters on 5 to 500 billion tokens"): below it a fitted loss is an extrapolation
FIT_MIN_PARAMS = 70e6

CHINCHILLA = LossFit(
    "chinchilla-approach3", 1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, arXiv 2203.15556, eq. 10"
)
EPOCH = LossFit(
    "epoch-refit", 1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024, arXiv 2404.10102"
)


def chinchilla_loss(n_params: float, tokens: float) -> float:
    """Chinchilla Approach-3 loss (nats/token on MassiveText; a rough estimate for other data)."""
    return CHINCHILLA.loss(n_params, tokens)


def epoch_loss(n_params: float, tokens: float) -> float:
    """Epoch AI refit of the Approach-3 loss (an estimate)."""
    return EPOCH.loss(n_params, tokens)


def loss_estimate(n_params: float, tokens: float, fit: str = "epoch") -> float:
    return (EPOCH if fit == "epoch" else CHINCHILLA).loss(n_params, tokens)


def chinchilla_tokens(params_active: float) -> float:
    """Compute-optimal training tokens: D = 20 N (Hoffmann et al. 2022)."""
    return TOKENS_PER_PARAM * float(params_active)


@lru_cache(maxsize=8)
def _optimal_solution(tokens_per_param: float):
    """Solve C = 6 N D with D = r N symbolically for N > 0 (=> N = sqrt(C / (6 r))).

    sympy is imported here, not at module level: it costs ~0.2 s of `llmc plan` cold start, and the
    closed form below is what the planner uses; tests check the two agree.
    """
    import sympy as sp

    N, C, r = sp.symbols("N C r", positive=True)
    sols = sp.solve(sp.Eq(C, 6 * N * (r * N)), N)
    (n_expr,) = sols
    return sp.lambdify((C, r), n_expr, "math")


def compute_optimal(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with C = 6 N D and D = tokens_per_param * N: N = sqrt(C / (6 r)), i.e. sqrt(C/120) at r=20
    (C in Chinchilla's 6ND convention, without the attention term)."""
    n = math.sqrt(float(flops) / (6.0 * float(tokens_per_param)))
    return n, tokens_per_param * n


def compute_optimal_symbolic(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """The same optimum solved with sympy (an independent derivation of compute_optimal's closed form)."""
    n = float(_optimal_solution(float(tokens_per_param))(float(flops), float(tokens_per_param)))
    return n, tokens_per_param * n


def tokens_per_param(params_active: float, tokens: float) -> float:
    return float(tokens) / float(params_active)


def trained_tokens(hyper, data_tokens: float) -> float:
    """The tokens the pre-training run trains (the D of the scaling laws and of the training FLOPs): with
    ``training.steps`` pinned, steps x the global batch (what the trainer runs); otherwise ``data.tokens`` (the
    steps are derived from it, ``defaults.default_steps``). ``hyper``: the run's resolved :class:`Hyper`."""
    if "steps" in hyper.defaults:
        return float(data_tokens)
    return float(hyper.steps * hyper.global_batch_tokens)


def unique_tokens(sources) -> float | None:
    """The unique tokens the data declares: the sum of ``sources[].tokens`` when every source declares its count,
    None otherwise (or without sources)."""
    if not sources or any(s.tokens is None for s in sources):
        return None
    return float(sum(s.tokens for s in sources))


def data_limited(optimal_tokens: float, unique: float | None) -> bool:
    """The compute-optimal D is more than ``MAX_EPOCHS`` epochs of the declared unique tokens."""
    return unique is not None and unique > 0 and optimal_tokens > MAX_EPOCHS * unique


def data_limit_note(optimal_tokens: float, unique: float | None, larger_model: bool = True) -> str | None:
    """What the compute-optimal advice must say when the data limits it (Muennighoff et al. 2023); None when not.
    ``larger_model``: the compute-optimal N is above the run's (the advice would grow the model), else below (it
    would train a smaller model longer)."""
    if not data_limited(optimal_tokens, unique):
        return None
    head = f"that D is {optimal_tokens / unique:.1f} epochs of the {_fmt(unique)} unique tokens the sources declare"
    if not larger_model:  # the optimum trains longer: past ~4 epochs the repeats lose value
        return (f"{head}, past the ~{MAX_EPOCHS:.0f} epochs within which repeated data is almost as good as new "
                "(Muennighoff et al. 2023, arXiv 2305.16264): add unique data before training longer")
    return (f"{head}; under a data limit extra compute is better spent on more epochs (up to ~{MAX_EPOCHS:.0f} are "
            "almost as good as new data) than on more parameters (Muennighoff et al. 2023, arXiv 2305.16264): "
            "add unique data before growing the model")


def predicted_losses(params_active: float, tokens: float, fit: LossFit = EPOCH) -> tuple[float, float]:
    """(loss of the run, loss at the 20 tok/param compute-optimal N, D of the same compute C = 6ND) under ``fit``
    (the Besiroglu et al. 2024 refit by default): nats/token on the fit's data (MassiveText, its tokenizer), for
    comparing N/D trade-offs, not an absolute prediction for other data. The 20x point is within ~1e-4 nats of
    the refit's own minimum (:meth:`LossFit.optimum`) over 1e20-1e25 FLOPs."""
    n_opt, d_opt = compute_optimal(6.0 * float(params_active) * float(tokens))
    return fit.loss(params_active, tokens), fit.loss(n_opt, d_opt)


def approach3_tokens_per_param(params_active: float, tokens: float) -> float:
    """Tokens per parameter at the minimum of Hoffmann et al. 2022's published Approach-3 fit for the run's compute
    C = 6ND (:meth:`LossFit.optimum`): far above 20, the inconsistency Besiroglu et al. 2024 found."""
    n, d = CHINCHILLA.optimum(6.0 * float(params_active) * float(tokens))
    return d / n


def per_param_text(r: float) -> str:
    """A tokens-per-parameter figure with significant digits: 1868, 19.9, 0.0312 (never '0.0')."""
    return f"{r:,.0f}" if abs(r) >= 100 else f"{r:.3g}"


def _fmt(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def scaling_diagnostics(params_active: float, tokens: float, path: str = "data.tokens",
                        unique: float | None = None) -> list[Diagnostic]:
    """C001: fewer than 20 tokens per (active) parameter -- under the compute-optimal ratio: a warning below
    ``UNDERTRAINED_WARN_FACTOR`` x 20 (10 tok/param), an info between (the IsoFLOP minimum is flat; the message
    gives the refit's loss cost). C002 (info): more than 200 tokens per parameter (10x the optimum) -- heavily
    over-trained, which is a deliberate inference-cost trade (Llama-3-8B: ~1875 tok/param), stated with the factor.
    ``tokens``: the tokens the run trains (:func:`trained_tokens`); ``unique``: the unique tokens the sources declare
    (:func:`unique_tokens`), which turn the advice to more epochs when the compute-optimal D exceeds ~4 epochs."""
    r = tokens_per_param(params_active, tokens)
    opt = chinchilla_tokens(params_active)
    n_opt, d_opt = compute_optimal(6.0 * params_active * tokens)
    limit = data_limit_note(d_opt, unique, larger_model=n_opt > params_active)
    out: list[Diagnostic] = []
    if r < TOKENS_PER_PARAM:
        optimum = (f"~{_fmt(n_opt)} params on {_fmt(d_opt)} tokens (Hoffmann et al. 2022)")
        if r < UNDERTRAINED_WARN_FACTOR * TOKENS_PER_PARAM:
            severity = "warning"
            message = (f"{per_param_text(r)} tokens per active parameter is under-trained vs compute-optimal "
                       f"({TOKENS_PER_PARAM:.0f}/param = {_fmt(opt)} tokens for {_fmt(params_active)} params)")
            hint = f"the same compute is optimal at {optimum}; train longer or use a smaller model"
        else:
            severity = "info"
            run_loss, opt_loss = predicted_losses(params_active, tokens)
            message = (f"{per_param_text(r)} tokens per active parameter: {r / TOKENS_PER_PARAM:.2g}x the "
                       f"compute-optimal {TOKENS_PER_PARAM:.0f}/param, within the flat IsoFLOP minimum (Hoffmann et "
                       f"al. 2022 Fig. 3; the Besiroglu et al. 2024 refit gives {run_loss - opt_loss:+.4f} nats/token "
                       "against the compute-optimal N, D)")
            hint = f"the same compute is optimal at {optimum}"
        if limit:
            hint += f"; {limit}"
        out.append(Diagnostic(code="C001", severity=severity, path=path, message=message, hint=hint))
    elif r > TOKENS_PER_PARAM * OVERTRAINED_FACTOR:
        if limit:
            hint = (f"fine when inference cost matters (Llama-3-8B: ~1875/param); the same compute is "
                    f"compute-optimal at ~{_fmt(n_opt)} params on {_fmt(d_opt)} tokens, but {limit}")
        else:
            hint = ("fine when inference cost matters (Llama-3-8B: ~1875/param); a larger model would reach "
                    "lower loss for the same compute")
        out.append(
            Diagnostic(
                code="C002",
                severity="info",
                path=path,
                message=(
                    f"{r:.0f} tokens per active parameter: over-trained {r / TOKENS_PER_PARAM:.0f}x "
                    f"relative to compute-optimal ({TOKENS_PER_PARAM:.0f}/param)"
                ),
                hint=hint,
            )
        )
    return out
