"""Scaling laws: compute-optimal size, the Chinchilla loss fit, and the tokens-per-parameter checks.

Sources:
* Hoffmann et al. 2022 ("Chinchilla", arXiv 2203.15556): ~20 training tokens per parameter is
  compute-optimal (Table 3), and C ~= 6ND.
* Approach-3 parametric fit L(N, D) = E + A/N^alpha + B/D^beta with E=1.69, A=406.4, B=410.7,
  alpha=0.34, beta=0.28 (Hoffmann et al. 2022, eq. 10). Minimised under C = 6ND these constants give
  72-138 tokens/param, not 20 -- the inconsistency Besiroglu et al. 2024 (Epoch AI, "Chinchilla
  Scaling: A replication attempt", arXiv 2404.10102) traced to the fit; their refit E=1.8172,
  A=482.01, B=2085.43, alpha=0.3478, beta=0.3658 is consistent with ~20 tokens/param.
  llmc therefore uses the 20x rule for "optimal N/D" and the loss fits only as rough loss estimates.
* For MoE models N is the *active* parameter count (the parameters a token's FLOPs scale with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from llmc.diagnostics import Diagnostic

TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022
OVERTRAINED_FACTOR = 10.0  # C002 fires above 10x the 20 tok/param optimum, i.e. > 200 tok/param


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


def _fmt(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def scaling_diagnostics(params_active: float, tokens: float, path: str = "data.tokens") -> list[Diagnostic]:
    """C001 (warning): fewer than 20 tokens per (active) parameter -- under-trained vs compute-optimal.
    C002 (info): more than 200 tokens per parameter (10x the optimum) -- heavily over-trained, which is
    a deliberate inference-cost trade (Llama-3-8B: ~1875 tok/param), stated with the factor."""
    r = tokens_per_param(params_active, tokens)
    opt = chinchilla_tokens(params_active)
    out: list[Diagnostic] = []
    if r < TOKENS_PER_PARAM:
        n_opt, d_opt = compute_optimal(6.0 * params_active * tokens)
        out.append(
            Diagnostic(
                code="C001",
                severity="warning",
                path=path,
                message=(
                    f"{r:.1f} tokens per active parameter is under-trained vs compute-optimal "
                    f"({TOKENS_PER_PARAM:.0f}/param = {_fmt(opt)} tokens for {_fmt(params_active)} params)"
                ),
                hint=(
                    f"the same compute is optimal at ~{_fmt(n_opt)} params on {_fmt(d_opt)} tokens "
                    "(Hoffmann et al. 2022); train longer or use a smaller model"
                ),
            )
        )
    elif r > TOKENS_PER_PARAM * OVERTRAINED_FACTOR:
        out.append(
            Diagnostic(
                code="C002",
                severity="info",
                path=path,
                message=(
                    f"{r:.0f} tokens per active parameter: over-trained {r / TOKENS_PER_PARAM:.0f}x "
                    f"relative to compute-optimal ({TOKENS_PER_PARAM:.0f}/param)"
                ),
                hint="fine when inference cost matters (Llama-3-8B: ~1875/param); a larger model would reach "
                "lower loss for the same compute",
            )
        )
    return out
