"""
The masked-diffusion (MD) objective, in one file you can copy.

Training (paper §3.3, §5):
    t  ~ U[t0, t1]                    mask ratio per sequence     (Def. 3.4)
    xt = x0 with each token -> MASK   independently, prob. t      (Def. 3.4)
    loss = (1/t) * sum_{masked i} CE(model(xt)_i, x0_i) / L       (§5's objective, unnumbered; LLaDA's Eq. 3)

The 1/t cross-entropy is §5's objective. The division by the sequence length L (and, for SFT, by
the answer's length) is not in the paper: it is LLaDA's recipe (its GUIDELINES.md), which keeps
the loss per token whatever L. (Def. 3.6 / Eq. (1) is the squared loss of the parity theory, with
weight 1/(2t): md_mse_loss.)

The standard recipe is t ~ U[0, 1]; the paper's point is that a narrower,
signal-rich window (e.g. U[0.45, 0.55] for language, U[0, 0.246] for (20,6)
parity) trains better. Whatever window a model trains on, it is *evaluated* with
t over the full [0, 1] (`elbo_nll`), so runs on different windows compare.

Departures, stated: dllm (the framework the paper pre-trained with, §5.2.1) draws t in
[1e-3, 1) and normalises by the batch's token count; here t is drawn on [t0, t1] as given and
masks with that raw t, and only the 1/t weight is floored (EPS); the loss is normalised per
sequence (LLaDA). `md_step_loss(stratified=True)` (wikitext.py) tiles a batch's t with one
offset instead of drawing each independently as Def. 3.4 does.
"""

import functools
import math

import torch
import torch.nn.functional as F

# The 1/t weight is infinite at t = 0. U[0, t1] draws t arbitrarily close to 0
# (MDLM and LLaDA hit the same issue), where a single draw with one masked token
# would carry weight ~1/t and blow up the gradient. Flooring t at 1e-3 bounds the
# weight by 1000 and changes the expected loss by a negligible O(eps) amount.
EPS = 1e-3


def check_interval(t0, t1):
    """Raise a one-line ValueError unless 0 <= t0 <= t1 <= 1."""
    if not (0.0 <= t0 <= 1.0 and 0.0 <= t1 <= 1.0):
        raise ValueError(f"mask ratios must lie in [0, 1], got t0={t0}, t1={t1}")
    if t0 > t1:
        raise ValueError(f"need t0 <= t1, got t0={t0} > t1={t1}")


def check_mask_id(mask_id, tokenizer_vocab, model_vocab, special=()):
    """The MASK token must be inside the model's vocabulary and never come out of text: a new id
    past the tokenizer's, or one of its special tokens (`special`: ids text cannot encode to,
    as LLaDA's <|mdm_mask|> = 126336)."""
    if 0 <= mask_id < tokenizer_vocab and mask_id not in special:
        raise ValueError(f"mask id {mask_id} is a real token of the tokenizer (vocab {tokenizer_vocab}): MASK must "
                         f"be an id no text encodes to (a special token such as <|mdm_mask|>, or one >= "
                         f"{tokenizer_vocab})")
    if not 0 <= mask_id < model_vocab:
        raise ValueError(f"mask id {mask_id} is outside the model's vocabulary of {model_vocab}")


def sample_t(n, t0=0.0, t1=1.0, *, dist="uniform", mean=None, std=None, stratified=False, generator=None,
             device=None):
    """n mask ratios: uniform on [t0, t1] (Def. 3.4; t0 == t1 is a point mass), or, with dist "beta" or
    "logit-normal", bell-shaped around `mean` with spread `std` (the paper's future work; t0 and t1 are
    then unused). Every distribution is drawn as its inverse CDF of one uniform u, so a run's draws
    differ between distributions only by that map.

    stratified=True: one shared random offset u and u_i = (u + i/n) mod 1, so the n values tile the
    quantiles evenly (for U[t0, t1]: spacing (t1 - t0)/n) while each one is still drawn from the
    distribution (LLaDA's shared-offset draw; MDLM instead jitters each stratum on its own). It lowers
    the variance of the batch loss at no cost, but the t of a batch are then not independent, as
    Def. 3.4's are.
    """
    check_interval(t0, t1)
    check_t_dist(dist, mean, std)
    if stratified:
        u = (torch.rand(1, generator=generator, device=device) + torch.arange(n, device=device) / n) % 1.0
    else:
        u = torch.rand(n, generator=generator, device=device)
    if dist == "uniform":
        return t0 + (t1 - t0) * u
    if dist == "logit-normal":        # logit t ~ N(logit(mean), std^2): `mean` is its median
        return torch.sigmoid(math.log(mean / (1 - mean)) + std * torch.special.ndtri(u))
    cdf, grid = beta_cdf(*beta_params(mean, std), str(u.device))     # Beta: its tabulated CDF, inverted
    i = torch.searchsorted(cdf, u.double()).clamp(1, len(cdf) - 1)
    w = ((u.double() - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp_min(1e-300)).clamp(0, 1)
    return (grid[i - 1] + w * (grid[i] - grid[i - 1])).to(u.dtype)


T_DISTS = ("uniform", "beta", "logit-normal")


def check_t_dist(dist, mean, std):
    """A distribution of t: uniform, or beta / logit-normal with 0 < mean < 1 and std > 0 (a Beta
    bell-shaped: both its shape parameters at least 1)."""
    if dist not in T_DISTS:
        raise ValueError(f"the t distribution must be one of {', '.join(T_DISTS)}, got {dist!r}")
    if dist == "uniform":
        return
    if mean is None or std is None or not (0 < mean < 1 and std > 0):
        raise ValueError(f"a {dist} t needs 0 < mean < 1 and std > 0, got mean {mean}, std {std}")
    if dist == "beta":
        beta_params(mean, std)


def beta_params(mean, std):
    """(a, b) of the Beta distribution with this mean and standard deviation; only bell shapes
    (a, b >= 1: a density that vanishes at t = 0 and t = 1)."""
    var = std ** 2
    if not var < mean * (1 - mean):
        raise ValueError(f"no Beta distribution has mean {mean} and std {std} (std must be below "
                         f"{math.sqrt(mean * (1 - mean)):.3f})")
    common = mean * (1 - mean) / var - 1
    a, b = mean * common, (1 - mean) * common
    if a < 1 or b < 1:
        raise ValueError(f"the Beta with mean {mean} and std {std} is not bell-shaped (a = {a:.2f}, b = {b:.2f}); "
                         f"use a smaller std")
    return a, b


@functools.lru_cache(maxsize=16)
def beta_cdf(a, b, device="cpu", points=2 ** 18 + 1):
    """(CDF, t): Beta(a, b)'s cumulative distribution on `points` equally spaced t of [0, 1], its density
    integrated by trapezoids (float64); sample_t inverts it by linear interpolation, exact to ~1e-6 in t."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    log_pdf = torch.xlogy(torch.tensor(a - 1.0, dtype=torch.float64), t) + \
        torch.xlogy(torch.tensor(b - 1.0, dtype=torch.float64), 1 - t)
    pdf = torch.exp(log_pdf - log_pdf.max())
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((pdf[1:] + pdf[:-1]) / 2, 0)])
    return (cdf / cdf[-1]).to(device), t.to(device)


def mask_tokens(x0, t, mask_id, *, maskable=None, generator=None):
    """Replace each token of row b by `mask_id` independently with probability t[b].

    `maskable` (bool, same shape as x0) limits where masks may fall: SFT keeps
    the prompt clean this way (LLaDA §2.3). Returns (xt, masked).
    """
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = u < t[:, None]
    if maskable is not None:
        masked &= maskable
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked


def token_ce(logits, targets):
    """Per-token cross-entropy, computed in fp32 whatever the logits' dtype. Under
    torch.compile the upcast fuses into the softmax: at a 50k vocabulary the
    eager fp32 copy and its gradient cost more GPU time than the transformer's
    matmuls (README "Speed")."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def compiled_token_ce():
    """token_ce under torch.compile (GPU runs): its fp32 upcast fuses into the softmax, so the
    (masked tokens x vocabulary) logits never exist in fp32. dynamic: the masked count varies."""
    return torch.compile(token_ce, dynamic=True)


def md_loss(logits, x0, masked, t, *, maskable=None, reduction="mean", ce_fn=token_ce):
    """The MD loss (§5's objective; LLaDA's Eq. 3 for pre-training, its Eq. 5 for SFT):

        (1/B) sum_b (1/t_b) sum_i masked[b,i] * CE(logits[b,i], x0[b,i]) / L_b

    L_b = number of maskable positions of row b (the full length when maskable is
    None): this normalisation is LLaDA's GUIDELINES.md recipe, not the paper's (§5 sums
    over positions): per token for pre-training, each answer by its own length for SFT.

    logits: (B, L, V), or (n_masked, V) already taken at the masked positions in
    row-major order (what `Transformer(..., output_mask=masked)` returns).
    reduction="none" returns the B per-row terms instead of their mean;
    ce_fn is token_ce, or a compiled copy of it.
    """
    B, L = x0.shape
    if logits.dim() == 3:
        logits = logits[masked]                      # (B, L, V) -> (n_masked, V), row-major
    ce = ce_fn(logits, x0[masked])                   # (n_masked,)
    n_valid = maskable.sum(1) if maskable is not None else torch.full_like(t, L)
    row_weight = 1.0 / (t.clamp_min(EPS) * n_valid.clamp_min(1))    # §5: 1/t; LLaDA: 1/L_b
    row = masked.nonzero()[:, 0]                     # the row of each masked token
    rows = torch.zeros(B, device=ce.device).index_add_(0, row, ce * row_weight[row])      # (B,)
    return rows.mean() if reduction == "mean" else rows


def md_step_loss(model, x0, mask_id, t0, t1, *, generator=None, stratified=False, maskable=None,
                 masked_head=True, ce_fn=token_ce, dist="uniform", mean=None, std=None):
    """One draw of the MD objective on a batch x0 (B, L), the step every training script takes:
    t ~ U[t0, t1] per sequence (Def. 3.4; stratified: see sample_t), the masks (SFT: only where
    `maskable`), the model (its output head at the masked positions only, when masked_head), the
    loss. Returns (loss, masked)."""
    t = sample_t(len(x0), t0, t1, dist=dist, mean=mean, std=std, stratified=stratified, generator=generator,
                 device=x0.device)                                                               # (B,)
    xt, masked = mask_tokens(x0, t, mask_id, maskable=maskable, generator=generator)             # (B, L)
    logits = model(xt, output_mask=masked) if masked_head else model(xt)
    return md_loss(logits, x0, masked, t, maskable=maskable, ce_fn=ce_fn), masked


def md_mse_loss(pred, x0, masked, t, *, reduction="mean"):
    """The paper's squared-loss objective, Def. 3.6 / Eq. (1) (weight 1/(2t)), on +-1 targets:

        (1/B) sum_b 1/(2 t_b) sum_{i masked} (pred[b,i] - x0[b,i])^2

    pred and x0 are real (B, L); used by the theory-faithful parity MLP (§4.1).
    """
    sq = (pred - x0.to(pred.dtype)).square() * masked
    rows = sq.sum(1) / (2 * t.clamp_min(EPS))
    return rows.mean() if reduction == "mean" else rows


@torch.no_grad()
def elbo_terms(model_fn, x0, mask_id, *, n_t=8, maskable=None, generator=None, chunk=None):
    """Per-draw terms of the full-range bound: returns (t, nll), each (B * n_t,).

    For every sequence, n_t mask ratios tile (0, 1] (stratified). Each draw masks
    exactly l = ceil(t * L) maskable tokens at random and scores the mean CE over
    them. Averaging over l uniform on {1..L} equals the continuous-time bound
    E_{t~U[0,1]} E_m[(1/t) sum_masked CE] / L exactly, because
    int_0^1 (1/t) Binom(l; L, t) dt = 1/l (LLaDA App. B.6 / Ou et al. 2025), and it
    has much lower variance than drawing a Bernoulli mask and weighting by 1/t.
    A model with uniform logits scores log V on every draw. chunk: rows per model call (the masks
    are drawn first, so the result does not depend on it; only the peak memory does).
    """
    B, L = x0.shape
    x = x0.repeat_interleave(n_t, 0)
    valid = (maskable.repeat_interleave(n_t, 0) if maskable is not None
             else torch.ones_like(x, dtype=torch.bool))
    n_valid = valid.sum(1)
    t = torch.cat([1.0 - sample_t(n_t, stratified=True, generator=generator, device=x0.device)
                   for _ in range(B)])                              # in (0, 1]
    n_mask = (t * n_valid).ceil().clamp(1, None).long()
    # mask the n_mask[b] valid positions with the smallest random scores
    scores = torch.rand(x.shape, generator=generator, device=x0.device).masked_fill(~valid, 2.0)
    rank = scores.argsort(1).argsort(1)
    masked = rank < n_mask[:, None]
    xt = torch.where(masked, torch.full_like(x, mask_id), x)
    nll = torch.zeros(len(x), device=x0.device)
    for lo in range(0, len(x), chunk or len(x)):
        part = slice(lo, lo + (chunk or len(x)))
        logits = model_fn(xt[part])
        if logits.dim() == 3:       # full (B, L, V) logits; (n_masked, V) ones are already gathered
            logits = logits[masked[part]]
        ce = F.cross_entropy(logits.float(), x[part][masked[part]], reduction="none")
        nll[part].index_add_(0, masked[part].nonzero()[:, 0], ce)
    return t, nll / n_mask


def elbo_nll(model_fn, x0, mask_id, *, n_t=8, maskable=None, generator=None):
    """The held-out test loss of §5: the MD bound on NLL per token (nats), t over
    the FULL [0, 1] whatever interval the model trained on. Pass a seeded
    `generator` so every run is scored on the same draws."""
    _, nll = elbo_terms(model_fn, x0, mask_id, n_t=n_t, maskable=maskable, generator=generator)
    return nll.mean().item()


def loss_per_t_bin(t, nll, n_bins=10):
    """Mean of `nll` within each of n_bins equal-width bins of t in [0, 1] (NaN if a bin is empty)."""
    b = (t * n_bins).ceil().clamp(1, n_bins).long() - 1
    sums = torch.zeros(n_bins, device=t.device).index_add_(0, b, nll)
    counts = torch.zeros(n_bins, device=t.device).index_add_(0, b, torch.ones_like(nll))
    return (sums / counts).tolist()
