"""T4 witness certificate: teacher information, the constant baseline, and the fitted witness."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from scipy.optimize import minimize
from scipy.special import log_softmax
from scipy.stats import entropy, norm

from hcdiag.checks.witness import (
    alignment_loss,
    certify_nonconstant,
    fit_softmax_witness,
    teacher_information,
)
from hcdiag.errors import InputError


def _teacher(rng, m, k, sparse=False):
    T = rng.dirichlet(np.full(k, 0.5), size=m)
    if sparse:  # some exact zeros: 0 log 0 = 0
        T[rng.random(size=T.shape) < 0.3] = 0.0
        T[np.arange(m), rng.integers(0, k, size=m)] += 1e-3
        T /= T.sum(axis=1, keepdims=True)
    return T


@pytest.mark.parametrize("sparse", [False, True])
def test_teacher_information_against_naive_and_scipy(seed, sparse):
    rng = np.random.default_rng(seed)
    T = _teacher(rng, 60, 5, sparse)
    mean = T.mean(axis=0)
    naive_h_mean = -sum(p * np.log(p) for p in mean if p > 0)
    naive_h_rows = np.mean([-sum(p * np.log(p) for p in row if p > 0) for row in T])
    got = teacher_information(torch.from_numpy(T))
    assert got == pytest.approx(naive_h_mean - naive_h_rows, rel=1e-10, abs=1e-13)
    assert got == pytest.approx(entropy(mean) - np.mean([entropy(r) for r in T]), rel=1e-10, abs=1e-13)


def test_best_constant_pays_exactly_teacher_information(seed):
    rng = np.random.default_rng(seed)
    T = _teacher(rng, 80, 4, sparse=True)
    info = teacher_information(T)
    assert alignment_loss(T, T.mean(axis=0)) == pytest.approx(info, rel=1e-10, abs=1e-13)
    naive = np.mean([sum(t * np.log(t / w) for t, w in zip(row, T.mean(axis=0)) if t > 0) for row in T])
    assert alignment_loss(T, np.tile(T.mean(axis=0), (80, 1))) == pytest.approx(naive, rel=1e-10, abs=1e-13)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6), st.integers(1, 30))
def test_any_other_constant_pays_more(s, k, m):
    rng = np.random.default_rng(s)
    T = _teacher(rng, m, k)
    W = rng.dirichlet(np.ones(k))
    info = teacher_information(T)
    loss = alignment_loss(T, W)
    # mean_x KL(T || W) = I_T + KL(mean T || W) for every constant W
    assert loss == pytest.approx(info + entropy(T.mean(axis=0), W), rel=1e-9, abs=1e-12)
    assert loss >= info - 1e-12


def test_alignment_infinite_where_witness_has_no_mass():
    T = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert alignment_loss(T, np.array([1.0, 0.0])) == np.inf
    assert alignment_loss(T, np.array([[0.5, 0.5], [1.0, 0.0]])) == 0.0


def _two_gaussians(rng, m, prior, sep):
    """Classes y ~ Bernoulli(prior) at -sep/2, +sep/2 (unit variance, 1-D); T = exact posterior."""
    y = rng.random(m) < prior
    x = np.where(y, sep / 2, -sep / 2) + rng.normal(size=m)
    log_odds = np.log(prior / (1 - prior)) + sep * x  # log p(y=1|x) - log p(y=0|x)
    p1 = 1 / (1 + np.exp(-log_odds))
    return x, np.stack([1 - p1, p1], axis=1)


def _true_information(prior, sep):
    """I(X; Y) = H(prior) - E_x H(p(y|x)), by quadrature (independent of the sampled teacher)."""
    def p_x(x):
        return (1 - prior) * norm.pdf(x, -sep / 2) + prior * norm.pdf(x, sep / 2)

    def h_post(x):
        p1 = prior * norm.pdf(x, sep / 2) / p_x(x)
        return entropy([p1, 1 - p1])

    lim = sep / 2 + 12
    return entropy([prior, 1 - prior]) - quad(lambda x: p_x(x) * h_post(x), -lim, lim, limit=200)[0]


def test_certificate_on_teacher_with_known_information(seed):
    rng = np.random.default_rng(seed)
    prior, sep = 0.3, 3.0
    truth = _true_information(prior, sep)  # about 0.40 nats
    x, T = _two_gaussians(rng, 6000, prior, sep)
    fit, ev = slice(0, 3000), slice(3000, 6000)
    info = teacher_information(T[ev])
    # Monte Carlo over 3000 rows: H(posterior) lies in [0, log 2], so its sample mean has sd
    # <= 0.347/sqrt(3000) = 0.0063; mean T has sd <= 0.5/sqrt(3000) and |H'| = |log(p/(1-p))| is
    # about 0.85 at p = 0.3, so H(mean T) has sd <= 0.008: 0.06 is over 4 sd of the sum
    assert info == pytest.approx(truth, abs=0.06)
    # features carrying the class: x itself plus two noise coordinates. The exact posterior is
    # a logistic function of x, so a linear softmax can match it: loss near 0, certified.
    feats = np.column_stack([x, rng.normal(size=(6000, 2))])
    cert = certify_nonconstant(feats[fit], T[fit], feats[ev], T[ev], margin=0.05)
    assert cert.certified and cert.loss < 0.02
    assert cert.best_constant_loss == cert.teacher_information == pytest.approx(info, rel=1e-12)
    assert cert.gap == pytest.approx(info - cert.loss, rel=1e-12)
    assert cert.relative_gap == pytest.approx(cert.gap / info, rel=1e-12)
    assert cert.relative_margin == pytest.approx(0.05 / info, rel=1e-12)
    assert (cert.n_fit, cert.n_eval) == (3000, 3000)
    assert cert.to_dict()["certified"] is True
    # constant features (a collapsed encoder): the witness can only be a constant, so it pays
    # at least I_T on eval, and exactly I_T + KL(mean T_eval || mean T_fit) (~0 here)
    const = np.tile(rng.normal(size=3), (6000, 1))
    flat = certify_nonconstant(const[fit], T[fit], const[ev], T[ev], margin=0.05)
    assert not flat.certified
    assert flat.loss >= flat.teacher_information - 1e-12
    expected = info + entropy(T[ev].mean(axis=0), T[fit].mean(axis=0))
    assert flat.loss == pytest.approx(expected, rel=1e-6)


def test_witness_fit_matches_scipy_minimum(seed):
    rng = np.random.default_rng(seed)
    m, d, k = 150, 2, 3
    f = rng.normal(size=(m, d))
    logits = f @ rng.normal(size=(d, k)) * 2 + rng.normal(size=(m, k))
    T = np.exp(log_softmax(logits, axis=1))
    l2 = 1e-2
    w = fit_softmax_witness(f, T, l2=l2)
    z = (f - f.mean(0)) / f.std(0)

    def objective(v):
        A, b = v[:d * k].reshape(d, k), v[d * k:]
        return -np.mean(np.sum(T * log_softmax(z @ A + b, axis=1), axis=1)) + l2 * np.sum(A * A)

    ref = minimize(objective, np.zeros(d * k + k), method="BFGS", options={"gtol": 1e-10})
    assert w.objective == pytest.approx(ref.fun, rel=1e-7)
    assert w.converged and w.n_iter >= 1
    P = w.predict(f)
    assert P.shape == (m, k) and torch.allclose(P.sum(1), torch.ones(m, dtype=torch.float64))
    # the witness never does worse on its fit split than the best constant
    assert alignment_loss(T, P) <= teacher_information(T) + 1e-12
    with pytest.raises(InputError, match=r"The 'features' must have d = 2 columns \(as at fit time\); got shape \(4, 3\)"):
        w.predict(np.zeros((4, 3)))


def test_witness_errors():
    T = np.array([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(InputError, match=r"The 'T' rows must sum to 1; 1 row\(s\) do not \(first: row 1\)"):
        teacher_information(np.array([[0.5, 0.5], [0.5, 0.6]]))
    with pytest.raises(InputError, match=r"The 'T' argument holds 1 negative value\(s\); its rows must be probability distributions"):
        teacher_information(np.array([[1.5, -0.5]]))
    with pytest.raises(InputError, match=r"The 'T' argument holds 1 non-finite value\(s\)"):
        teacher_information(np.array([[np.nan, 1.0]]))
    with pytest.raises(InputError, match=r"The 'W' argument must have K = 2 columns \(as the teacher\); got shape \(2, 3\)"):
        alignment_loss(T, np.full((2, 3), 1 / 3))
    with pytest.raises(InputError, match=r"The 'T' and 'W' arguments must have the same number of rows; got \(2, 2\) and \(3, 2\)"):
        alignment_loss(T, np.full((3, 2), 0.5))
    with pytest.raises(InputError, match=r"The 'features' and 'T' arguments must have the same number of rows; got \(3, 1\) and \(2, 2\)"):
        fit_softmax_witness(np.zeros((3, 1)), T)
    with pytest.raises(InputError, match=r"The 'l2' parameter must be a finite float >= 0. Got -1"):
        fit_softmax_witness(np.zeros((2, 1)), T, l2=-1)
    with pytest.raises(InputError, match=r"The 'max_iter' parameter must be an int >= 1. Got 0"):
        fit_softmax_witness(np.zeros((2, 1)), T, max_iter=0)
    with pytest.raises(InputError, match=r"The 'margin' parameter must be a finite float >= 0 \(nats\). Got -0.1"):
        certify_nonconstant(np.zeros((2, 1)), T, np.zeros((2, 1)), T, margin=-0.1)
    with pytest.raises(InputError, match=r"The fit and eval splits must have the same columns; got features \(2, 1\) vs \(2, 2\)"):
        certify_nonconstant(np.zeros((2, 1)), T, np.zeros((2, 2)), T)
