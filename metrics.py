"""Small statistics shared by the studies: AUROC, bootstrap intervals, power-law fits.

Plain torch and ``math``, no SciPy: every function works on CPU tensors or Python sequences and
is vectorised over leading dimensions where that makes sense (many layers, many bootstrap draws).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch


def auroc(scores, labels, dim: int = -1) -> torch.Tensor:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), along ``dim``.

    Rank-based (Mann–Whitney U): the chance that a random positive scores above a random negative,
    ties counted as one half. ``scores`` and ``labels`` broadcast, so one call scores every layer
    or every bootstrap draw. A slice with no positive or no negative gives NaN.
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels)
    s, y = torch.broadcast_tensors(s, y.to(s.dtype))
    s, y = s.movedim(dim, -1), y.movedim(dim, -1).bool()
    ordered = s.sort(-1).values.contiguous()
    below = torch.searchsorted(ordered, s.contiguous(), right=False)  # strictly smaller
    upto = torch.searchsorted(ordered, s.contiguous(), right=True)  # smaller or equal
    ranks = (below + upto + 1).to(s.dtype) / 2  # 1-based ranks, ties averaged
    n_pos = y.sum(-1).to(s.dtype)
    n_neg = y.shape[-1] - n_pos
    u = (ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)  # 0/0 → NaN where a class is missing


def bootstrap_ci(statistic: Callable[..., torch.Tensor], *samples, draws: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of ``statistic`` over items resampled with replacement.

    ``samples`` share their first dimension (the items); each draw resamples those rows, and
    ``statistic`` gets every draw at once, as tensors of shape ``[draws, n, ...]``, and returns
    ``[draws, ...]``. Draws where the statistic is NaN (a resample with one class) are left out.
    Returns ``(low, high)``, each shaped like one draw's statistic. Seeded: same inputs, same interval.
    """
    if not samples:
        raise ValueError("bootstrap_ci needs at least one sample")
    tensors = [torch.as_tensor(x) for x in samples]
    n = tensors[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in tensors):
        raise ValueError("bootstrap_ci: the samples must share a non-empty first dimension")
    if not 0 < level < 1 or draws < 1:
        raise ValueError("bootstrap_ci: expected 0 < level < 1 and draws ≥ 1")
    index = torch.randint(n, (draws, n), generator=torch.Generator().manual_seed(seed))
    values = torch.as_tensor(statistic(*(t[index] for t in tensors)), dtype=torch.float64)
    tail = (1 - level) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    low, high = torch.nanquantile(values, q, dim=0)
    return low, high


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate: sensible at 0 of n (unlike the normal one), in [0, 1]."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n or not 0 < level < 1:
        raise ValueError("wilson_interval: expected 0 ≤ successes ≤ n and 0 < level < 1")
    z = torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)).item()
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def binary_scores(predicted, actual) -> dict[str, float]:
    """Precision, recall, F1, false-positive rate and accuracy of 0/1 predictions (1 = the positive class).

    An empty denominator gives 0 (no positive predicted → precision and F1 are 0), so predicting
    the negative class everywhere scores F1 = 0 rather than NaN.
    """
    p = torch.as_tensor(predicted).bool().flatten()
    y = torch.as_tensor(actual).bool().flatten()
    if p.shape != y.shape:
        raise ValueError(f"binary_scores: {p.numel()} predictions for {y.numel()} labels")
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    fn, tn = int((~p & y).sum()), int((~p & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "fpr": fp / (fp + tn) if fp + tn else 0.0,
            "accuracy": (tp + tn) / max(1, p.numel())}


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (bisection on its CDF)."""
    if not 0 < p < 1 or dof < 1:
        raise ValueError("t_quantile: expected 0 < p < 1 and dof ≥ 1")
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(t: float) -> float:  # 1/2 + ∫_0^t density, by Simpson's rule on a fine even grid
        steps = 2000
        h = t / steps
        f = [math.exp(log_norm - (dof + 1) / 2 * math.log1p((i * h) ** 2 / dof)) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def power_law_fit(n: Sequence[float], d: Sequence[float], level: float = 0.95) -> tuple[float, float, float, tuple[float, float]]:
    """Fit ``d = a · n^b`` by least squares on ``log d = log a + b log n``.

    Returns ``(a, b, r2, (b_low, b_high))``: R² of the log–log fit and a t-based ``level``
    interval on the exponent (n − 2 degrees of freedom). Needs ≥ 3 points, all positive, and
    at least two distinct ``n``.
    """
    x = torch.as_tensor(n, dtype=torch.float64)
    y = torch.as_tensor(d, dtype=torch.float64)
    if x.dim() != 1 or x.shape != y.shape or x.numel() < 3:
        raise ValueError("power_law_fit: expected two 1-D sequences of the same length ≥ 3")
    if not bool((x > 0).all() and (y > 0).all()):
        raise ValueError("power_law_fit: every n and d must be positive (logarithms)")
    lx, ly = x.log(), y.log()
    sxx = ((lx - lx.mean()) ** 2).sum()
    if sxx == 0:
        raise ValueError("power_law_fit: needs at least two distinct n")
    b = ((lx - lx.mean()) * (ly - ly.mean())).sum() / sxx
    log_a = ly.mean() - b * lx.mean()
    residual = ly - (log_a + b * lx)
    sse, sst = (residual**2).sum(), ((ly - ly.mean()) ** 2).sum()
    r2 = float(1 - sse / sst) if sst > 0 else 1.0
    dof = x.numel() - 2
    half = t_quantile((1 + level) / 2, dof) * math.sqrt(float(sse) / dof / float(sxx))
    return math.exp(float(log_a)), float(b), r2, (float(b) - half, float(b) + half)


def roc_curve(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(FPR, TPR) at every distinct threshold of ``scores`` (higher = positive), from (0, 0) to (1, 1).

    Tied scores move together (one point per distinct score, as scikit-learn's ``roc_curve`` with
    ``drop_intermediate=False``). Needs at least one positive and one negative.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if s.shape != y.shape or n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve: expected scores and labels of one length, with both classes present")
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last item of each group of tied scores
    tp = y.cumsum(0)[last].double()
    fp = (~y).cumsum(0)[last].double()
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fp / n_neg]), torch.cat([zero, tp / n_pos])


def tpr_at_fpr(fpr: torch.Tensor, tpr: torch.Tensor, level: float) -> float:
    """The highest TPR among ROC points whose FPR is at most ``level`` (e.g. 0.01)."""
    return float(tpr[fpr <= level + 1e-12].max())


def _log_binomial_pmf(k: int, log_q: torch.Tensor, log_1mq: torch.Tensor) -> torch.Tensor:
    i = torch.arange(k + 1, dtype=torch.float64)
    log_choose = math.lgamma(k + 1) - torch.lgamma(i + 1) - torch.lgamma(k - i + 1)
    return log_choose + i * log_q + (k - i) * log_1mq


def audit_p_value(m: int, k: int, v: int, eps: float, delta: float) -> float:
    """P-value of "v of k guesses right" under the null that training was (ε, δ)-DP (Steinke et al. 2023, Thm 3).

    ``m`` canaries, each a member with probability ½; the auditor guesses on ``k`` of them and
    abstains on the rest. p = P[Bin(k, q) ≥ v] + 2mδ · max_{1≤i≤v} P[v−i ≤ Bin(k, q) < v] / i,
    with q = e^ε / (1 + e^ε) the accuracy of ε-DP randomised response.
    """
    if not 0 <= v <= k <= m:
        raise ValueError(f"audit_p_value: expected 0 ≤ v ≤ k ≤ m, got v={v}, k={k}, m={m}")
    e = torch.tensor(float(eps), dtype=torch.float64)
    pmf = _log_binomial_pmf(k, -torch.nn.functional.softplus(-e), -torch.nn.functional.softplus(e)).exp()
    beta = float(pmf[v:].sum())
    alpha = 0.0
    if v > 0:
        below = pmf[:v].flip(0).cumsum(0)  # i-th entry (from 1): P[v−i ≤ Bin < v]
        alpha = float((below / torch.arange(1, v + 1, dtype=torch.float64)).max())
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, k: int, v: int, delta: float, confidence: float = 0.05) -> float:
    """The largest ε that ``v`` right guesses out of ``k`` reject at level ``confidence`` (one-run audit).

    Training that was (ε, δ)-DP for any ε below the bound would make this many right guesses with
    probability < ``confidence``. 0 when even ε = 0 is not rejected. Doubling, then 50 bisections.
    """
    if not 0 < confidence < 1 or not 0 <= delta <= 1:
        raise ValueError("epsilon_lower_bound: expected 0 < confidence < 1 and 0 ≤ delta ≤ 1")
    if audit_p_value(m, k, v, 0.0, delta) >= confidence:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, k, v, high, delta) < confidence:
        low, high = high, high * 2
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if audit_p_value(m, k, v, mid, delta) < confidence else (low, mid)
    return low
