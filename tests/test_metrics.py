import itertools

import pytest
import torch

from lantern.metrics import auroc, bootstrap_ci, power_law_fit, t_quantile


def _pairwise_auroc(scores, labels) -> float:
    """The definition: the share of (positive, negative) pairs ranked right, ties counting one half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _reference(scores, labels) -> float:
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return _pairwise_auroc(scores, labels)
    return float(roc_auc_score(labels, scores))


def test_auroc_by_hand_with_ties():
    # positives 0.4, 0.8, 0.4 against negatives 0.1, 0.4: 1 + ½ + 1 + 1 + 1 + ½ = 5 of 6 pairs
    assert auroc([0.1, 0.4, 0.4, 0.8, 0.4], [0, 0, 1, 1, 1]).item() == pytest.approx(5 / 6)
    assert auroc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]).item() == 0.5  # all tied: chance, not NaN
    assert auroc([0.0, 1.0], [0, 1]).item() == 1.0 and auroc([0.0, 1.0], [1, 0]).item() == 0.0
    assert torch.isnan(auroc([0.1, 0.2], [1, 1]))  # one class: undefined


def test_auroc_matches_a_reference_computation_batched_and_along_any_dim():
    g = torch.Generator().manual_seed(0)
    for n in (5, 17, 60):
        scores = (torch.randn(4, n, generator=g) * 2).round() / 2  # coarse values: many ties
        labels = torch.rand(4, n, generator=g) < 0.4
        labels[:, 0], labels[:, 1] = True, False
        got = auroc(scores, labels)
        want = [_reference(s.tolist(), y.tolist()) for s, y in zip(scores, labels)]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
        torch.testing.assert_close(auroc(scores.T, labels.T, dim=0), got)


def test_flipping_scores_or_labels_mirrors_auroc_and_keeps_the_effect():
    g = torch.Generator().manual_seed(1)
    labels = torch.rand(80, generator=g) < 0.5
    scores = torch.randn(80, generator=g) + 1.5 * labels
    a = auroc(scores, labels)
    torch.testing.assert_close(auroc(-scores, labels), 1 - a)
    torch.testing.assert_close(auroc(scores, ~labels), 1 - a)
    assert (auroc(-scores, labels) - 0.5).abs() == pytest.approx(float((a - 0.5).abs()))
    assert a > 0.65


def test_shuffled_labels_give_chance():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(100) % 2 == 0
    scores = torch.randn(100, generator=g) + 3.0 * labels  # a strong signal, destroyed by shuffling
    shuffled = torch.stack([labels[torch.randperm(100, generator=g)] for _ in range(400)])
    values = auroc(scores.expand(400, -1), shuffled)
    assert auroc(scores, labels) > 0.9
    assert values.mean().item() == pytest.approx(0.5, abs=0.01)


def test_bootstrap_interval_is_seeded_covers_the_estimate_and_has_the_right_width():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, generator=g)
    low, high = bootstrap_ci(lambda s: s.mean(-1), x, draws=2000, seed=7)
    assert (low, high) == bootstrap_ci(lambda s: s.mean(-1), x, draws=2000, seed=7)
    assert low < x.mean() < high
    assert (high - low).item() == pytest.approx(2 * 1.96 * x.std().item() / 400**0.5, rel=0.15)
    # several statistics at once: shape [draws, 2] → intervals of shape [2]
    low2, high2 = bootstrap_ci(lambda s: torch.stack([s.mean(-1), s.median(-1).values], -1), x, draws=200)
    assert low2.shape == (2,) and bool((low2 < high2).all())
    with pytest.raises(ValueError, match="share a non-empty first dimension"):
        bootstrap_ci(lambda a, b: a, torch.zeros(3), torch.zeros(4))


def test_t_quantile_matches_tables():
    for dof, want in ((1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, dof) == pytest.approx(want, abs=2e-3)
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile(0.975, 5))
    assert t_quantile(0.95, 10**6) == pytest.approx(1.645, abs=1e-3)


def test_power_law_fit_recovers_a_and_b_and_its_interval_covers():
    n = torch.logspace(8, 10.85, 9, dtype=torch.float64)  # 0.1B … 70B
    a, b = 0.02, 0.12
    exact = power_law_fit(n.tolist(), (a * n**b).tolist())
    assert exact[0] == pytest.approx(a, rel=1e-9) and exact[1] == pytest.approx(b, rel=1e-9) and exact[2] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(4)
    covered, fits = 0, []
    for _ in range(300):
        d = a * n**b * torch.exp(0.05 * torch.randn(9, generator=g, dtype=torch.float64))
        fit_a, fit_b, r2, (low, high) = power_law_fit(n, d)
        fits.append((fit_a, fit_b))
        covered += low <= b <= high
    mean_a = sum(f[0] for f in fits) / len(fits)
    mean_b = sum(f[1] for f in fits) / len(fits)
    assert mean_b == pytest.approx(b, abs=0.003) and mean_a == pytest.approx(a, rel=0.15)
    assert 0.90 <= covered / 300 <= 0.99  # a 95% interval covers ~95% of the time


def test_power_law_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="length ≥ 3"):
        power_law_fit([1e8, 1e9], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        power_law_fit([1e8, 1e9, 1e10], [0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="distinct n"):
        power_law_fit([1e9, 1e9, 1e9], [0.1, 0.2, 0.3])
