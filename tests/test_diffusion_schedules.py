"""Noise schedules (hcdiag.diffusion.schedules) against naive loops of diffusers' DDPMScheduler formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hcdiag.diffusion import Schedule, family, parse_schedule
from hcdiag.errors import InputError
from hcdiag.theory import betas as theory_betas


def _naive(kind, T, a=None, b=None, s=0.008, max_beta=0.999):
    out = []
    for i in range(T):  # diffusers: index i = 0..T-1 is timestep t = i + 1
        if kind == "linear":
            out.append(a + (b - a) * i / (T - 1))
        elif kind == "scaled_linear":
            out.append((math.sqrt(a) + (math.sqrt(b) - math.sqrt(a)) * i / (T - 1)) ** 2)
        elif kind == "sigmoid":
            u = -6 + 12 * i / (T - 1)
            out.append(a + (b - a) / (1 + math.exp(-u)))
        else:
            def f(t):
                return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
            out.append(min(1 - f((i + 1) / T) / f(i / T), max_beta))
    return np.array(out)


@pytest.mark.parametrize("kind,a,b", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("sigmoid", 1e-4, 0.02),
                                      ("linear", 3e-4, 0.05)])
def test_beta_range_kinds_match_the_formulas(kind, a, b, seed):
    T = int(np.random.default_rng(seed).integers(2, 1500))
    sch = Schedule(kind, T, beta_start=a, beta_end=b)
    np.testing.assert_allclose(sch.betas(), _naive(kind, T, a, b), rtol=1e-10, atol=1e-14)


def test_cosine_matches_the_formula_and_the_theory_module(seed):
    T = int(np.random.default_rng(seed).integers(2, 1500))
    np.testing.assert_allclose(Schedule("cosine", T).betas(), _naive("cosine", T), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(Schedule("cosine", T).betas(), theory_betas("cosine", T), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(Schedule("linear", T).betas(), theory_betas("linear", T), rtol=1e-12)
    np.testing.assert_allclose(Schedule("cosine", T, s=0.02).betas(), _naive("cosine", T, s=0.02), rtol=1e-10, atol=1e-14)


def test_alphabar_snr_and_terminal_snr(seed):
    for kind in ("linear", "scaled_linear", "cosine", "sigmoid"):
        sch = Schedule(kind, 1000)
        b = sch.betas()
        a = np.array([np.prod(1 - b[:t + 1]) for t in range(0, 1000, 97)])
        np.testing.assert_allclose(sch.alphabar()[::97], a, rtol=1e-10)
        assert (np.diff(sch.alphabar()) < 0).all()
        np.testing.assert_allclose(np.exp(sch.log_snr()), sch.snr(), rtol=1e-9)
        assert sch.terminal_snr == pytest.approx(sch.alphabar()[-1] / (1 - sch.alphabar()[-1]), rel=1e-12)
        assert f"terminal SNR {sch.terminal_snr:.3g}" in sch.describe()
    # DDPM's linear schedule keeps about 4e-5 of the signal's variance at T = 1000 (Lin et al. 2024 table 1: 0.0064
    # signal amplitude, i.e. alphabar ~ 4.0e-5)
    assert math.sqrt(Schedule("linear").alphabar()[-1]) == pytest.approx(0.0064, abs=5e-5)


def test_parse_and_families():
    assert parse_schedule("linear:1e-4,0.03").beta_end == 0.03 and parse_schedule("cosine:0.02").s == 0.02
    assert parse_schedule("sigmoid", T=50).T == 50 and parse_schedule("scaled_linear").beta_start == 0.00085
    fam = family("linear", 4)
    ends = [s.beta_end for s in fam]
    assert len(set(ends)) == 4 and ends == sorted(ends) and all(s.beta_start == 1e-4 for s in fam)
    np.testing.assert_allclose(np.diff(np.log(ends)), np.log(4) / 3, rtol=1e-12)  # geometric over [/2, x2]
    assert [s.s for s in family("cosine", 2)] == pytest.approx([0.004, 0.016])
    assert family("sigmoid", 1)[0] == Schedule("sigmoid")


@pytest.mark.parametrize("call,msg", [
    (lambda: Schedule("quadratic"), "Unknown noise schedule 'quadratic'; choose among linear, scaled_linear, cosine, sigmoid"),
    (lambda: Schedule("linear", 1), "T must be an integer in 2..100000"),
    (lambda: Schedule("linear", beta_start=0.1, beta_end=0.01), "needs 0 < beta_start <= beta_end < 1"),
    (lambda: Schedule("cosine", s=1.5), "needs 0 <= s < 1 and 0 < max_beta < 1"),
    (lambda: parse_schedule("linear:a,b"), "the values after the colon must be numbers"),
    (lambda: parse_schedule("linear:1,2,3"), "at most two values"),
    (lambda: family("linear", 0), "needs R >= 1"),
])
def test_bad_schedules_get_one_line(call, msg):
    with pytest.raises(InputError, match=msg) as e:
        call()
    assert "\n" not in str(e.value)
