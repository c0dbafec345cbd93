"""
Every quantitative result of the paper's theory, computed exactly and checked by Monte Carlo.

    python theory.py                                # the table + plots in out/theory
    python theory.py --k 3 --n 10                   # another (n, k)
    python theory.py --corpus wiki.train.raw --tokenizer-file gpt2.tiktoken   # t* from a corpus

§4.2-4.4 and App. B-F.4 of the paper. For (n, k) parity with t ~ U[t0, t1]:
  signal_prob       P_S = (k+1) E[t (1-t)^k]                       Thm 4.3
  best_t1           the t1 maximising P_S for fixed t0 (0.246)     §4.5 / Fig. 2
  sample_bound      N >= 4 log(4n/delta) / (E[t] E[(1-t)^k]^2)      Thm 4.2
  sample_optimal_t1 the t1 minimising that bound (t0 = 0)          Cor. 4.7
  energy            E(W) = c^T Sigma^+ c                           Thm 4.5, Cor. 4.6
For language (App. F.4): Signal(t) ~ sum_i w_i t (1-t)^(i-1) with n-gram weights
w_i, maximised at t* ~ 0.46 (0.48 when the signal counts quadratically).
"""
import argparse
import math
import os

import numpy as np

from machinery import cli, corpus
from machinery.files import save_figure
from machinery.run import Run, done_line

SCRIPT = "theory.py"
MAX_DRAWS = 10_000_000
PAPER_WIKITEXT_WEIGHTS = {2: 0.7427, 3: 0.2063, 4: 0.0401, 5: 0.0084, 6: 0.0024}   # App. F.4


def check_k(k):
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def check_interval(t0, t1):
    if not (0.0 <= t0 <= t1 <= 1.0):
        raise ValueError(f"need 0 <= t0 <= t1 <= 1, got t0={t0}, t1={t1}")


def check_delta(delta):
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


# ----------------------------------------------------------------------------- moments of t ~ U[t0, t1]

def mean_pow(t0, t1, a, b):
    """E[t^a (1-t)^b] for t ~ U[t0, t1] (point mass when t0 == t1), exactly: expand
    t^a = (1 - u)^a in u = 1 - t and integrate the polynomial term by term."""
    check_interval(t0, t1)
    if t0 == t1:
        return t0 ** a * (1 - t0) ** b
    # t^a (1-t)^b = sum_j C(a,j) (-1)^j u^(b+j), and dt = -du
    G = lambda u: sum(math.comb(a, j) * (-1) ** j * u ** (b + j + 1) / (b + j + 1) for j in range(a + 1))
    return (G(1 - t0) - G(1 - t1)) / (t1 - t0)


def signal_prob(t0, t1, k):
    """Thm 4.3: P_S = (k+1) E_{t~U[t0,t1]}[t (1-t)^k], the probability that exactly
    one of the k+1 positions of S' = S u {label} is masked (the signal regime)."""
    check_k(k)
    return (k + 1) * mean_pow(t0, t1, 1, k)


# ----------------------------------------------------------------------------- optimal rates

def signal_optimal_point(k):
    """Cor. 4.8: t0 = t1 = 1/(k+1) maximises P_S; there d/dt t(1-t)^k = 0."""
    check_k(k)
    return 1.0 / (k + 1)


def _bisect(f, lo, hi, iters=200):
    """Root of f on [lo, hi] with a sign change (plain bisection: exact enough, no SciPy)."""
    flo = f(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (f(mid) > 0) == (flo > 0):
            lo, flo = mid, f(mid)
        else:
            hi = mid
    return (lo + hi) / 2


def best_t1(k, t0=0.0):
    """The t1 that maximises P_S(t0, t1) for a fixed t0 (k = 6, t0 = 0: 0.246, the
    interval `python parity.py --t1 0.246` uses). At the optimum the integrand at
    t1 equals its mean over [t0, t1]: t1 (1-t1)^k = E_{U[t0,t1]}[t (1-t)^k]. When
    t0 >= 1/(k+1) the integrand only falls beyond t0, so the best is the point t1 = t0."""
    check_k(k)
    check_interval(t0, t0)
    if t0 >= 1.0 / (k + 1):
        return t0
    g = lambda t1: t1 * (1 - t1) ** k - mean_pow(t0, t1, 1, k)
    return _bisect(g, 1.0 / (k + 1), 1.0)


def sample_bound(t0, t1, k, n, delta=0.05):
    """Thm 4.2: samples needed so that S is identifiable with probability 1 - delta."""
    check_k(k)
    check_delta(delta)
    if t1 == 0:
        return math.inf
    return 4 * math.log(4 * n / delta) / (mean_pow(t0, t1, 1, 0) * mean_pow(t0, t1, 0, k) ** 2)


def sample_optimal_t1(k):
    """Cor. 4.7 with t0 = 0. k = 1: any interval with E[t] = 1/3, so t1 = 2/3. k > 1:
    t1 = 1 - y, y the root in (0, 1) of (2k+1) y^(k+1) - (2k+2) y^k + 1 = 0 (y = 1
    is always a root, and not the one we want)."""
    check_k(k)
    if k == 1:
        return 2.0 / 3.0
    coeffs = np.zeros(k + 2)
    coeffs[0], coeffs[1], coeffs[-1] = 2 * k + 1, -(2 * k + 2), 1.0
    y = [r.real for r in np.roots(coeffs) if abs(r.imag) < 1e-9 and 1e-9 < r.real < 1 - 1e-6]
    return 1.0 - max(y)


def cor47_residual(k, t1):
    y = 1 - t1
    return (2 * k + 1) * y ** (k + 1) - (2 * k + 2) * y ** k + 1


# ----------------------------------------------------------------------------- language (App. F.4)

def language_signal(t, weights, power=1):
    """Signal(t) = sum_i w_i [t (1-t)^(i-1)]^power: an order-i dependency is learnt
    when exactly its target is masked and its i-1 context tokens are visible.
    power=1 is F.4's linear model, power=2 counts the signal quadratically (Thm 4.5)."""
    t = np.asarray(t, dtype=float)
    return sum(w * (t * (1 - t) ** (i - 1)) ** power for i, w in weights.items())


def language_t_star(weights, power=1):
    """argmax_t Signal(t), exactly: the real root in (0, 1) of the polynomial's derivative."""
    P = np.polynomial.Polynomial
    poly = sum(w * (P([0, 1]) * P([1, -1]) ** (i - 1)) ** power for i, w in weights.items())
    roots = [r.real for r in poly.deriv().roots() if abs(r.imag) < 1e-9 and 0 < r.real < 1]
    return max(roots, key=lambda r: poly(r))


def ngram_weights(ids, max_order=6, min_count=5):
    """Weights w_2..w_max_order from a token stream (the estimator is ours; App. F.4
    does not spell one out): w_i is proportional to the information an order-i
    dependency adds, w_i ~ max(H_(i-1) - H_i, 0), where H_i is the plug-in
    conditional entropy of a token given its i-1 predecessors, computed over the
    i-gram types seen at least min_count times (rarer ones discarded, as F.4 does):
        H_i = - sum_g c(g)/C log( c(g) / c(prefix of g) ),
    c counting kept i-grams only, C their total. H_1 is the unigram entropy."""
    ids = np.asarray(ids, dtype=np.uint64)
    H, prefix_keys = [], None
    for order in range(1, max_order + 1):
        n = len(ids) - order + 1
        if n <= 0:
            raise ValueError(f"corpus of {len(ids)} tokens is too short for {max_order}-grams")
        # exact keys for order <= 4 (50257^4 < 2^64); beyond, a 64-bit hash of (prefix key, token)
        last = ids[order - 1:order - 1 + n]
        if order == 1:
            keys = last.copy()
        else:
            prev = prefix_keys[:n]
            keys = prev * np.uint64(50257) + last if order <= 4 else _mix(prev ^ _mix(last + np.uint64(order)))
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        keep = counts >= min_count
        c_occ = counts[inverse]                        # count of the i-gram at each position
        kept = keep[inverse]
        C = kept.sum()
        if C == 0:       # no estimate of H_i at all: w_i would be 0 by default, and t* biased towards 0.5
            raise ValueError(f"the corpus ({len(ids):,} tokens) has no {order}-gram seen {min_count} times or more: "
                             f"too few counts to estimate w_{order}; use a larger corpus")
        if order == 1:
            p = counts[keep] / counts[keep].sum()
            H.append(float(-(p * np.log(p)).sum()))
        else:
            # c(prefix) over kept i-grams: group kept positions by their prefix key
            _, pinv = np.unique(prev[kept], return_inverse=True)
            pc = np.bincount(pinv, weights=np.ones(len(pinv)))   # occurrences of each prefix among kept
            H.append(float(-np.mean(np.log(c_occ[kept] / pc[pinv]))))
        prefix_keys = keys
    gains = {i: max(H[i - 2] - H[i - 1], 0.0) for i in range(2, max_order + 1)}
    total = sum(gains.values())
    if total == 0:
        raise ValueError(f"the corpus ({len(ids):,} tokens) shows no dependency between tokens (no entropy drop "
                         f"from H_1 to H_{max_order}): no t* to estimate")
    return {i: g / total for i, g in gains.items()}, H


def _mix(x):
    """splitmix64 finaliser: a well-spread 64-bit hash, vectorised (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


# ----------------------------------------------------------------------------- Monte Carlo for (n, k) parity

def sample_masks(n, k, t0, t1, draws, rng):
    """Draws of Def. 3.4 on x' = (x, y): t ~ U[t0, t1], each of the n+1 positions
    masked with probability t. Returns x' (+-1), masks, t and S' (label = index n)."""
    S_prime = np.r_[np.sort(rng.choice(n, k, replace=False)), n]
    x = rng.choice([-1, 1], size=(draws, n + 1))
    x[:, n] = x[:, S_prime[:-1]].prod(1)
    t = t0 + (t1 - t0) * rng.random(draws)
    m = rng.random((draws, n + 1)) < t[:, None]
    return x, m, t, S_prime


def mc_mean(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


def mc_parity(n, k, t0, t1, draws=400_000, seed=0):
    """Monte Carlo of the regime split: the signal fraction (-> P_S, Thm 4.3) and the
    |M|/(2t) weights of Thm 4.3/4.5, overall and on signal draws; each (mean, se)."""
    rng = np.random.default_rng(seed)
    _, m, t, S_prime = sample_masks(n, k, t0, t1, draws, rng)
    signal = m[:, S_prime].sum(1) == 1
    w = m.sum(1) / (2 * t)
    return dict(signal=mc_mean(signal), weight=mc_mean(w), weight_signal=mc_mean(w * signal))


def weight_exact(n, k, t0, t1):
    """E[|M|/(2t)] = (n+1)/2, since E[|M| | t] = (n+1) t; and its signal-regime part
    E[|M|/(2t) 1_S] = (k+1)/2 E[(1-t)^k (1 + (n-k) t)] (one S' position masked,
    plus a Binomial(n-k, t) count of masked noise positions)."""
    return (n + 1) / 2, (k + 1) / 2 * (mean_pow(t0, t1, 0, k) + (n - k) * mean_pow(t0, t1, 1, k))


def bayes_risk(t, k, signal=True):
    """Def. B.1: R*_i(t) = E[H(x'_i | visible)] for a masked bit i. A noise bit is
    independent of everything: log 2. A bit of S' is determined iff its k partners
    in S' are all visible (probability (1-t)^k), else uniform."""
    return (1 - (1 - t) ** k) * math.log(2) if signal else math.log(2)


def bayes_risk_mc(n, k, t, signal=True, draws=4000, seed=0):
    """Def. B.1 by brute force: for each draw, the exact posterior of the masked bit i
    given the visible tokens, by enumerating all 2^n inputs (n <= 14)."""
    if n > 14:
        raise ValueError("bayes_risk_mc enumerates 2^n inputs; use n <= 14")
    rng = np.random.default_rng(seed)
    x, m, _, S_prime = sample_masks(n, k, t, t, draws, rng)
    i = S_prime[0] if signal else next(j for j in range(n) if j not in S_prime)
    m[:, i] = True                                               # condition on i being masked
    allx = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    allx = np.c_[allx, allx[:, S_prime[:-1]].prod(1)]            # every x' = (x, y)
    H = np.empty(draws)
    for d in range(draws):
        vis = ~m[d]
        consistent = (allx[:, vis] == x[d, vis]).all(1)
        p = (allx[consistent, i] == 1).mean()
        H[d] = 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return mc_mean(H)


# ----------------------------------------------------------------------------- energy (Thm 4.5, Cor. 4.6)

def one_hot_z(x, m):
    """Def. 3.5 / §4.1: z = sum_j e_{3j + b_j}, b = 0 for -1, 1 for +1, 2 for MASK."""
    draws, L = x.shape
    b = np.where(m, 2, (x > 0).astype(int))
    z = np.zeros((draws, 3 * L))
    z[np.arange(draws)[:, None], 3 * np.arange(L) + b] = 1.0
    return z


def energy_terms(n, k, t0, t1, draws=20_000, seed=0, S_prime=None):
    """Sampled (z, w = |M|/(2t), signal indicator, f*) for the energy, f* = x'_k/|M| on
    signal draws (Thm 4.3) and 0 on noise draws."""
    rng = np.random.default_rng(seed)
    x, m, t, S_sampled = sample_masks(n, k, t0, t1, draws, rng)
    if S_prime is not None:                    # same secret set for every interval
        x[:, n] = x[:, S_prime[:-1]].prod(1)
    else:
        S_prime = S_sampled
    hits = m[:, S_prime]
    signal = hits.sum(1) == 1
    size = m.sum(1)
    f_star = np.where(signal, (x[:, S_prime] * hits).sum(1) / np.maximum(size, 1), 0.0)
    w = size / (2 * np.maximum(t, 1e-12))
    return one_hot_z(x, m), w, signal, f_star


def energy(W, terms):
    """Thm 4.5: E(W) = c^T Sigma^+ c with c = E[1_S |M|/(2t) f* h], Sigma = E[|M|/(2t) h h^T],
    h = relu(W z). Minimising the loss over the readout v leaves Const - E(W)."""
    z, w, signal, f_star = terms
    h = np.maximum(z @ W.T, 0.0)
    c = (w * signal * f_star) @ h / len(w)
    Sigma = (h * w[:, None]).T @ h / len(w)
    return float(c @ np.linalg.pinv(Sigma, rcond=1e-10, hermitian=True) @ c)


def planted_W(n, S_prime, extra=32, seed=0):
    """A W that can express the parity of the visible S' bits: neurons
    relu(sum_{i in S', visible} x_i - theta) for theta = -(k+1), -(k-1), ..., k-1 (a
    bias is a constant on all 3(n+1) coordinates, since z always has n+1 ones),
    plus `extra` random neurons."""
    rng = np.random.default_rng(seed)
    L, kp1 = n + 1, len(S_prime)
    rows = []
    for theta in np.arange(-kp1, kp1, 2) + 0.5:
        r = np.full(3 * L, -theta / L)
        r[3 * S_prime] -= 1.0      # value -1
        r[3 * S_prime + 1] += 1.0  # value +1
        rows.append(r)
    return np.vstack(rows + [rng.normal(size=(extra, 3 * L)) / math.sqrt(L)])


def pure_signal_energies(n, k, t0, t1, T=150, D=400, seed=0):
    """Cor. 4.6 on a finite set: keep T signal-regime draws only (P_N = 0) and two
    random over-parameterised W (D >= T). Then E(W) = (1/T) sum w f*^2 for both: the
    landscape is flat. With the noise draws kept, E depends on W. Returns
    (E(W1), E(W2), the constant) pure, then (E(W1), E(W2)) with noise."""
    z, w, signal, f_star = energy_terms(n, k, t0, t1, draws=20 * T, seed=seed)
    rng = np.random.default_rng(seed + 1)
    W1, W2 = (rng.normal(size=(D, z.shape[1])) for _ in range(2))
    idx = np.flatnonzero(signal)[:T]
    pure = tuple(z[idx] for _ in range(1)) + (w[idx], signal[idx], f_star[idx])
    mixed = (z, w, signal, f_star)                 # all 20T draws, signal and noise: D < 20T
    const = float((w[idx] * f_star[idx] ** 2).mean())
    return (energy(W1, pure), energy(W2, pure), const), (energy(W1, mixed), energy(W2, mixed))


# ----------------------------------------------------------------------------- the table and the plots

FIG2_T1 = (0.1, 0.2, 0.246, 0.3, 0.4, 1.0)


def table_rows(n, k, delta, t0, t1, draws, seed, corpus_weights=None):
    """(quantity, ours, paper, Monte Carlo or numerical check) for every number of the theory."""
    rows = []
    f = lambda v, d=4: "—" if v is None else f"{v:.{d}f}"
    pm = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"
    for i, b in enumerate(FIG2_T1):
        mc = mc_parity(n, k, 0.0, b, draws, seed + i)
        rows.append((f"P_S, U[0, {b}] (Thm 4.3)", f(signal_prob(0.0, b, k)), "—", pm(mc["signal"])))
    mc = mc_parity(n, k, t0, t1, draws, seed + 99)
    rows.append((f"P_S, U[{t0}, {t1}] (your interval)", f(signal_prob(t0, t1, k)), "—", pm(mc["signal"])))
    rows.append(("P_S-optimal point 1/(k+1) (Cor. 4.8)", f(signal_optimal_point(k)), f(1 / (k + 1)), "—"))
    grid = np.linspace(1e-4, 1, 20001)
    bt = best_t1(k, 0.0)
    rows.append(("P_S-optimal t1 for t0 = 0", f(bt), "0.246" if k == 6 else "—",
                 f"grid argmax {grid[np.argmax([signal_prob(0, g, k) for g in grid])]:.4f}"))
    rows.append((f"P_S at U[0, {bt:.3f}]", f(signal_prob(0, bt, k)), "—", "—"))
    if t0 > 0:
        rows.append((f"P_S-optimal t1 for t0 = {t0}", f(best_t1(k, t0)), "—", "—"))
    so = sample_optimal_t1(k)
    rows.append(("sample-optimal t1, t0 = 0 (Cor. 4.7)", f(so), "root of (2k+1)y^(k+1)-(2k+2)y^k+1",
                 f"residual {cor47_residual(k, so):.1e}; grid argmin "
                 f"{grid[np.argmin([sample_bound(0, g, k, n, delta) for g in grid])]:.4f}"))
    for b in (bt, so, 1.0):
        rows.append((f"Thm 4.2 bound N, U[0, {b:.3f}], delta={delta}", f(sample_bound(0, b, k, n, delta), 0), "—", "—"))
    exact_w, exact_ws = weight_exact(n, k, t0, t1)
    rows.append((f"E[|M|/(2t)], U[{t0}, {t1}]", f(exact_w), "—", pm(mc["weight"])))
    rows.append((f"E[|M|/(2t) ; signal], U[{t0}, {t1}]", f(exact_ws), "—", pm(mc["weight_signal"])))
    nb = min(n, 12)
    for t in (0.1, 0.3):
        for sig in (True, False):
            which = "signal bit" if sig else "noise bit"
            rows.append((f"Bayes risk R*(t={t}), {which} (Def. B.1)", f(bayes_risk(t, k, sig)),
                         "(1-(1-t)^k) log 2" if sig else "log 2",
                         pm(bayes_risk_mc(nb, k, t, sig, draws=2000, seed=seed)) + f" (n={nb})"))
    for name, w in (("paper's WikiText weights", PAPER_WIKITEXT_WEIGHTS), ("corpus weights", corpus_weights)):
        if w is None:
            continue
        paper = name.startswith("paper")
        rows.append((f"t* linear, {name} (F.4)", f(language_t_star(w, 1)), "0.46" if paper else "—", "—"))
        rows.append((f"t* quadratic, {name} (F.4)", f(language_t_star(w, 2)), "0.48" if paper else "—", "—"))
    (p1, p2, const), (m1, m2) = pure_signal_energies(n, k, 0.0, bt, seed=seed)
    rows.append(("Cor. 4.6: E(W1), E(W2) with P_N = 0", f"{p1:.4f}, {p2:.4f}", "Const",
                 f"(1/T) sum w f*^2 = {const:.4f}"))
    rows.append(("Cor. 4.6: E(W1), E(W2) with noise draws", f"{m1:.4f}, {m2:.4f}", "W-dependent", "—"))
    return rows


def energy_curve(n, k, t1s, seed=0):
    """E(W) of a planted W (this repository's construction, planted_W; the paper plants none) for
    U[0, t1] over t1, same S' and W throughout."""
    S_prime = np.r_[np.arange(k), n]
    W = planted_W(n, S_prime, seed=seed)
    return [(signal_prob(0, b, k), energy(W, energy_terms(n, k, 0, b, seed=seed, S_prime=S_prime))) for b in t1s]


def make_plots(out_dir, n, k, delta, corpus_weights=None, energies=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.linspace(1e-3, 1, 1000)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kk in range(1, 9):
        line, = ax.plot(grid, [signal_prob(0, b, kk) for b in grid], label=f"k = {kk}")
        b = best_t1(kk)
        ax.plot(b, signal_prob(0, b, kk), "o", color=line.get_color())
    ax.set(xlabel="t1  (t ~ U[0, t1])", ylabel="P_S", title="Signal probability P_S vs t1 (dots: optimum)")
    ax.legend(ncol=2)
    save_figure(fig, os.path.join(out_dir, "signal_prob.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sets = [("paper's WikiText weights", PAPER_WIKITEXT_WEIGHTS)] + ([("corpus weights", corpus_weights)]
                                                                    if corpus_weights else [])
    for name, w in sets:
        for power, ls in ((1, "-"), (2, "--")):
            s = language_signal(grid, w, power)
            ts = language_t_star(w, power)
            line, = ax.plot(grid, s / s.max(), ls, label=f"{name}, {'linear' if power == 1 else 'quadratic'}: "
                                                        f"t* = {ts:.3f}")
            ax.axvline(ts, color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="mask ratio t", ylabel="Signal(t) / max", title="App. F.4: n-gram mixture signal")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out_dir, "language_signal.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kk in (2, 3, k) if k not in (2, 3) else (2, 3, 4):
        g = grid[grid > 0.02]
        line, = ax.plot(g, [sample_bound(0, b, kk, n, delta) for b in g], label=f"k = {kk}")
        so = sample_optimal_t1(kk)
        ax.plot(so, sample_bound(0, so, kk, n, delta), "o", color=line.get_color())
    ax.set(xlabel="t1  (t ~ U[0, t1])", ylabel="N bound (Thm 4.2)", yscale="log",
           title=f"Sample-complexity bound, n = {n}, delta = {delta} (dots: Cor. 4.7)")
    ax.legend()
    save_figure(fig, os.path.join(out_dir, "sample_bound.png"))

    if energies:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        t1s, vals = zip(*sorted(energies.items()))
        ps, es = zip(*vals)
        ax.plot(ps, es, "o-")
        for b, p, e in zip(t1s, ps, es):
            ax.annotate(f"U[0,{b:g}]", (p, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ref = np.array(sorted(ps))
        ax.plot(ref, es[list(t1s).index(min(t1s, key=lambda b: abs(b - best_t1(k))))] * (ref / max(ps)) ** 2,
                "k:", label="∝ P_S² (through the P_S optimum)")
        ax.set(xlabel="P_S", ylabel="E(W) of a planted W", yscale="log", xscale="log",
               title=f"Thm 4.5: energy vs P_S, ({n}, {k}) parity")
        ax.legend()
        save_figure(fig, os.path.join(out_dir, "energy.png"))


def default_out_dir(a):
    """out/theory/n<n>k<k>[_U<t0>-<t1>][_<corpus>_<tokenizer>]: each command of the README a folder of its own."""
    interval = None if (a.t0, a.t1) == (0.0, 0.246) else f"U{a.t0:g}-{a.t1:g}"
    corpus = os.path.basename(os.path.normpath(a.corpus)) if a.corpus else None
    order = f"order{a.max_order}" if a.corpus and a.max_order != 6 else None
    return os.path.join("out", "theory", "_".join(str(p) for p in (f"n{a.n}k{a.k}", interval, corpus,
                                                                   a.tokenizer if a.corpus else None, order) if p))


def main(argv=None):
    p = argparse.ArgumentParser(description="Recompute the paper's theoretical numbers beside the paper's values, "
                                            "with Monte Carlo checks, and plot them.")
    p.add_argument("--n", type=int, default=20, help="parity input bits")
    p.add_argument("--k", type=int, default=6, help="secret set size")
    p.add_argument("--delta", type=float, default=0.05, help="failure probability of Thm 4.2")
    p.add_argument("--t0", type=float, default=0.0, help="an interval of your own: lower end")
    p.add_argument("--t1", type=float, default=0.246, help="an interval of your own: upper end")
    p.add_argument("--corpus", default=None, help="raw text file, or a Hub WikiText name (wikitext-103-raw-v1), "
                                                  "for n-gram weights")
    p.add_argument("--tokenizer", default="gpt2", help="the corpus's tokens: gpt2 (tiktoken's BPE) | bytes "
                                                       "(%(default)s)")
    p.add_argument("--tokenizer-file", default=None, help="local gpt2.tiktoken rank file (no download)")
    p.add_argument("--max-order", type=int, default=6, help="--corpus: the longest n-gram weighed, w_2..w_N (F.4: 6) "
                                                             "(%(default)s)")
    p.add_argument("--draws", type=int, default=400_000, help="Monte Carlo draws per estimate")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws (%(default)s)")
    p.add_argument("--out-dir", default=None, help="table, summary.json and plots (default: out/theory/ and a "
                                                   "folder named by the settings)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    a = cli.parse(p, argv)
    with cli.user_input():
        check_k(a.k)
        if a.k > a.n:
            raise ValueError(f"need k <= n, got n={a.n}, k={a.k}")
        check_interval(a.t0, a.t1)
        check_delta(a.delta)
    cli.check_positive(draws=a.draws)
    if a.max_order < 2:
        raise cli.UserError(f"--max-order must be at least 2 (w_2 is the first weight), got {a.max_order}")
    if a.draws > MAX_DRAWS:        # the Monte Carlo holds draws x (n + 1) masks in memory
        raise cli.UserError(f"--draws {a.draws:,} is more than this script holds in memory; at most {MAX_DRAWS:,}")
    cli.check_seed(a.seed)
    out_dir = a.out_dir or default_out_dir(a)
    settings = {k: v for k, v in vars(a).items() if k not in ("out_dir", "plot", "given")}
    with Run(SCRIPT, settings, out_dir, inputs={"corpus": a.corpus} if a.corpus else None, resumable=False) as run:
        if run.done:
            print(done_line(out_dir))
            return
        corpus_weights = None
        if a.corpus:
            ids = corpus.corpus_ids(a.corpus, a.tokenizer, a.tokenizer_file)
            with cli.user_input():
                corpus_weights, H = ngram_weights(ids, max_order=a.max_order)
            print(f"corpus {a.corpus}: {len(ids):,} {a.tokenizer} tokens; H_1..H_{a.max_order} = "
                  f"{', '.join(f'{h:.3f}' for h in H)} nats; w_2..w_{a.max_order} = "
                  f"{', '.join(f'{w:.4f}' for w in corpus_weights.values())}")
        rows = table_rows(a.n, a.k, a.delta, a.t0, a.t1, a.draws, a.seed, corpus_weights)
        energies = dict(zip(FIG2_T1 + (0.05, 0.6), energy_curve(a.n, a.k, FIG2_T1 + (0.05, 0.6), a.seed)))
        for b in sorted(energies):
            ps, e = energies[b]
            rows.append((f"Thm 4.5 energy E(W), planted W, U[0, {b:g}]", f"{e:.4f}", "∝ P_S²",
                         f"E / P_S² = {e / ps**2:.3f}"))
        widths = [max(len(r[i]) for r in rows + [("quantity", "ours", "paper", "check")]) for i in range(4)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
        print(f"(n, k) = ({a.n}, {a.k}); Monte Carlo: {a.draws:,} draws, seed {a.seed}")
        print(line(("quantity", "ours", "paper", "Monte Carlo (mean ± s.e.) / check")))
        for r in rows:
            print(line(r))
        if a.plot:
            make_plots(out_dir, a.n, a.k, a.delta, corpus_weights, energies)
        run.finish(dict(corpus_weights=corpus_weights,
                        table=[dict(zip(("quantity", "ours", "paper", "check"), r)) for r in rows]))
    print(f"wrote {out_dir}/summary.json" + (", signal_prob.png, language_signal.png, sample_bound.png, "
                                             "energy.png" if a.plot else ""))


if __name__ == "__main__":
    cli.run_cli(main)
