import math
import os

import numpy as np
import pytest
from conftest import SHARED_DATA

import theory


def quad(f, a, b, n=200_001):
    x = np.linspace(a, b, n)
    return np.trapezoid(f(x), x) / (b - a)


@pytest.mark.parametrize("t0,t1,k", [(0, 0.246, 6), (0.1, 0.5, 3), (0.45, 0.55, 1), (0, 1, 8)])
def test_signal_prob_closed_form_matches_quadrature(t0, t1, k):
    want = (k + 1) * quad(lambda t: t * (1 - t) ** k, t0, t1)
    assert theory.signal_prob(t0, t1, k) == pytest.approx(want, rel=1e-8)


def test_mean_pow_and_point_mass():
    assert theory.mean_pow(0.2, 0.7, 2, 3) == pytest.approx(quad(lambda t: t**2 * (1 - t) ** 3, 0.2, 0.7), rel=1e-8)
    assert theory.signal_prob(0.3, 0.3, 4) == pytest.approx(5 * 0.3 * 0.7**4)


@pytest.mark.parametrize("t0,t1", [(0, 0.246), (0.05, 0.3), (0, 1)])
def test_signal_prob_matches_monte_carlo(t0, t1):
    mean, se = theory.mc_parity(20, 6, t0, t1, draws=200_000, seed=1)["signal"]
    assert abs(mean - theory.signal_prob(t0, t1, 6)) < 4 * se


def test_weights_match_monte_carlo():
    mc = theory.mc_parity(20, 6, 0.05, 0.3, draws=200_000, seed=2)
    exact, exact_signal = theory.weight_exact(20, 6, 0.05, 0.3)
    assert exact == 10.5
    assert abs(mc["weight"][0] - exact) < 4 * mc["weight"][1]
    assert abs(mc["weight_signal"][0] - exact_signal) < 4 * mc["weight_signal"][1]


def test_known_values_to_three_decimals():
    assert round(theory.best_t1(6), 3) == 0.246
    assert theory.signal_optimal_point(6) == pytest.approx(1 / 7)
    assert round(theory.language_t_star(theory.PAPER_WIKITEXT_WEIGHTS, 1), 2) == 0.46
    assert round(theory.language_t_star(theory.PAPER_WIKITEXT_WEIGHTS, 2), 2) == 0.48
    assert round(theory.language_t_star(theory.PAPER_WIKITEXT_WEIGHTS, 1), 3) == 0.463
    assert round(theory.language_t_star(theory.PAPER_WIKITEXT_WEIGHTS, 2), 3) == 0.481


@pytest.mark.parametrize("k", [1, 3, 6])
def test_best_t1_is_the_grid_argmax(k):
    grid = np.linspace(1e-4, 1, 100_001)
    best = grid[np.argmax([theory.signal_prob(0, g, k) for g in grid])]
    assert theory.best_t1(k) == pytest.approx(best, abs=2e-5)
    t0 = 0.05
    grid0 = grid[grid >= t0]
    best0 = grid0[np.argmax([theory.signal_prob(t0, g, k) for g in grid0])]
    assert theory.best_t1(k, t0) == pytest.approx(best0, abs=2e-5)
    assert theory.best_t1(k, 0.9) == 0.9                         # past 1/(k+1): the point mass


def test_point_optimum_maximises_integrand():
    for k in range(1, 9):
        t = theory.signal_optimal_point(k)
        f = lambda s, k=k: s * (1 - s) ** k
        assert f(t) > f(t - 1e-3) and f(t) > f(t + 1e-3)


@pytest.mark.parametrize("k", [2, 3, 6, 10])
def test_cor47_root_satisfies_polynomial_and_minimises_bound(k):
    t1 = theory.sample_optimal_t1(k)
    assert 0 < t1 < 1
    assert abs(theory.cor47_residual(k, t1)) < 1e-10
    grid = np.linspace(0.01, 1, 99_001)
    best = grid[np.argmin([theory.sample_bound(0, g, k, 20, 0.05) for g in grid])]
    assert t1 == pytest.approx(best, abs=2e-5)


def test_cor47_k1_any_interval_with_mean_one_third():
    b = theory.sample_bound(0, 2 / 3, 1, 20, 0.1)
    assert theory.sample_optimal_t1(1) == pytest.approx(2 / 3)
    assert theory.sample_bound(1 / 3, 1 / 3, 1, 20, 0.1) == pytest.approx(b)
    assert theory.sample_bound(0.2, 0.2 + 2 * (1 / 3 - 0.2), 1, 20, 0.1) == pytest.approx(b)
    assert theory.sample_bound(0, 0.5, 1, 20, 0.1) > b and theory.sample_bound(0, 0.8, 1, 20, 0.1) > b


def test_sample_bound_formula():
    n, k, d = 20, 6, 0.05
    e_t, e_k = 0.123, theory.mean_pow(0, 0.246, 0, 6)
    assert theory.sample_bound(0, 0.246, k, n, d) == pytest.approx(4 * math.log(4 * n / d) / (e_t * e_k**2))


@pytest.mark.parametrize("t,signal", [(0.1, True), (0.3, True), (0.3, False)])
def test_bayes_risk_matches_brute_force_posterior(t, signal):
    mean, se = theory.bayes_risk_mc(10, 3, t, signal, draws=6000, seed=4)
    want = theory.bayes_risk(t, 3, signal)
    assert abs(mean - want) < 4 * se + 1e-12


def test_energy_is_invariant_to_positive_scaling_of_W():
    S_prime = np.r_[np.arange(3), 10]
    terms = theory.energy_terms(10, 3, 0, 0.3, draws=5000, S_prime=S_prime)
    W = np.random.default_rng(0).normal(size=(40, 33))
    e = theory.energy(W, terms)
    assert e > 0
    assert theory.energy(2.5 * W, terms) == pytest.approx(e, rel=1e-8)
    assert theory.energy(0.1 * W, terms) == pytest.approx(e, rel=1e-8)


def test_cor46_pure_signal_energy_is_w_independent():
    (p1, p2, const), (m1, m2) = theory.pure_signal_energies(20, 6, 0, 0.246)
    assert p1 == pytest.approx(const, rel=1e-8) and p2 == pytest.approx(const, rel=1e-8)
    assert abs(m1 - m2) > 1e-3 * max(m1, m2)


def test_ngram_weights_on_a_deterministic_chain():
    # each token fixes the next: all the structure is bigram, H_2 = 0
    ids = np.tile(np.arange(7), 200)
    w, H = theory.ngram_weights(ids)
    assert H[0] == pytest.approx(math.log(7), rel=1e-9) and H[1] == pytest.approx(0, abs=1e-12)
    assert w[2] == pytest.approx(1.0) and sum(w.values()) == pytest.approx(1.0)


def test_ngram_weights_second_order_chain():
    # x_t = (x_{t-1} + x_{t-2}) mod 5 from a random start: bigrams are uninformative
    rng = np.random.default_rng(0)
    seq = []
    for _ in range(400):
        a, b = rng.integers(0, 5, 2)
        run = [a, b]
        for _ in range(30):
            run.append((run[-1] + run[-2]) % 5)
        seq += run
    w, H = theory.ngram_weights(np.array(seq), max_order=4)
    assert w[3] > 0.8 and H[2] < 0.3


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "wikitext-2")), reason="needs ../shared/data")
def test_ngram_t_star_on_wikitext2():
    from machinery import corpus
    enc = corpus.gpt2_tokenizer(os.path.join(SHARED_DATA, "gpt2-tokenizer", "gpt2.tiktoken"))
    ids = enc.encode_ordinary(open(os.path.join(SHARED_DATA, "wikitext-2", "wiki.valid.raw")).read())
    w, _ = theory.ngram_weights(ids)
    assert w[2] > w[3] > w[6]
    assert 0.40 < theory.language_t_star(w, 1) < theory.language_t_star(w, 2) < 0.5


@pytest.mark.parametrize("call", [lambda: theory.signal_prob(0, 0.2, 0), lambda: theory.signal_prob(0.5, 0.2, 3),
                                  lambda: theory.sample_bound(0, 0.2, 3, 20, 1.5),
                                  lambda: theory.sample_bound(0, 0.2, 3, 20, 0.0),
                                  lambda: theory.best_t1(-2), lambda: theory.signal_prob(0, 1.2, 3)])
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_cli_writes_table_and_plots(tmp_path, capsys):
    theory.main(["--out-dir", str(tmp_path), "--draws", "20000"])
    out = capsys.readouterr().out
    assert "0.2459" in out and "0.4630" in out and "0.4814" in out
    for f in ("summary.json", "signal_prob.png", "language_signal.png", "sample_bound.png", "energy.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_ngram_weights_of_bytes_by_hand(tmp_path):
    """Issue 32: theory.py --tokenizer bytes. "aab" repeated: H_1 = H(2/3, 1/3); after "a" the next byte is
    a coin flip, after "b" it is "a" (H_2 = 2/3 log 2); two bytes decide the next one (H_3 = ... = 0). So
    w_2 : w_3 = (H_1 - H_2) : H_2, and w_4 = w_5 = w_6 = 0."""
    import json
    corpus = tmp_path / "aab.txt"
    corpus.write_text("aab" * 400)
    theory.main(["--corpus", str(corpus), "--tokenizer", "bytes", "--draws", "1000", "--no-plot",
                 "--out-dir", str(tmp_path / "t")])
    w = json.load(open(tmp_path / "t" / "summary.json"))["corpus_weights"]
    H1 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    H2 = 2 / 3 * math.log(2)
    assert w["2"] == pytest.approx((H1 - H2) / H1, abs=2e-3) and w["3"] == pytest.approx(H2 / H1, abs=2e-3)
    assert all(w[str(i)] == pytest.approx(0, abs=1e-9) for i in (4, 5, 6))
