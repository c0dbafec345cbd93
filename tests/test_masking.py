import math

import pytest
import torch

import masking


def test_md_loss_matches_hand_computation():
    # B=2, L=3, V=2. Row 0: t=0.5, positions 0 and 2 masked. Row 1: t=0.25, position 1 masked.
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]],
                           [[1.0, 1.0], [0.0, 3.0], [5.0, 0.0]]])
    x0 = torch.tensor([[0, 1, 0], [1, 0, 0]])
    masked = torch.tensor([[True, False, True], [False, True, False]])
    t = torch.tensor([0.5, 0.25])
    ce = lambda a, b, y: math.log(math.exp(a) + math.exp(b)) - (a, b)[y]
    row0 = (ce(2, 0, 0) + ce(0, 1, 0)) / 0.5 / 3
    row1 = ce(0, 3, 0) / 0.25 / 3
    want = (row0 + row1) / 2
    assert masking.md_loss(logits, x0, masked, t).item() == pytest.approx(want, rel=1e-6)
    # the same loss from logits already taken at the masked positions (masked-only head)
    assert masking.md_loss(logits[masked], x0, masked, t).item() == pytest.approx(want, rel=1e-6)


def test_md_loss_with_maskable_divides_by_answer_length():
    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.0, 0.0], [3.0, 1.0]]])
    x0 = torch.tensor([[1, 1, 0, 0]])
    maskable = torch.tensor([[False, True, True, True]])      # position 0 is the prompt
    masked = torch.tensor([[False, True, False, True]])
    t = torch.tensor([0.4])
    ce = lambda a, b, y: math.log(math.exp(a) + math.exp(b)) - (a, b)[y]
    want = (ce(1, 0, 1) + ce(3, 1, 0)) / 0.4 / 3               # L_b = 3 maskable tokens
    got = masking.md_loss(logits, x0, masked, t, maskable=maskable).item()
    assert got == pytest.approx(want, rel=1e-6)


def test_md_loss_floors_t():
    logits = torch.zeros(1, 2, 2)
    x0 = torch.zeros(1, 2, dtype=torch.long)
    masked = torch.tensor([[True, False]])
    got = masking.md_loss(logits, x0, masked, torch.tensor([0.0])).item()
    assert got == pytest.approx(math.log(2) / masking.EPS / 2, rel=1e-6)


def test_md_loss_uses_the_given_ce_and_token_ce_is_fp32():
    # with CE = 1 per masked token the loss is mean_b |M_b| / (t_b L): the 1/t weights alone
    masked = torch.tensor([[True, False, True, True], [False, True, False, False]])
    x0, t = torch.zeros(2, 4, dtype=torch.long), torch.tensor([0.5, 0.25])
    loss = masking.md_loss(torch.zeros(4, 3), x0, masked, t, ce_fn=lambda logits, y: torch.ones(len(y)))
    assert loss.item() == pytest.approx(((3 / (0.5 * 4)) + (1 / (0.25 * 4))) / 2)
    logits = torch.randn(5, 7).to(torch.bfloat16)
    y = torch.arange(5)
    ce = masking.token_ce(logits, y)
    assert ce.dtype == torch.float32
    assert torch.allclose(ce, -torch.log_softmax(logits.float(), -1)[torch.arange(5), y])


def test_md_mse_loss_hand_computation():
    pred = torch.tensor([[0.5, -1.0, 0.0], [1.0, 1.0, -0.5]])
    x0 = torch.tensor([[1, -1, 1], [-1, 1, 1]])
    masked = torch.tensor([[True, True, False], [True, False, True]])
    t = torch.tensor([0.2, 0.5])
    row0 = (0.25 + 0.0) / (2 * 0.2)
    row1 = (4.0 + 2.25) / (2 * 0.5)
    assert masking.md_mse_loss(pred, x0, masked, t).item() == pytest.approx((row0 + row1) / 2)


def test_mask_tokens_rate_and_maskable():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 10, (400, 500), generator=g)
    t = torch.linspace(0.05, 0.95, 400)
    maskable = torch.rand(x0.shape, generator=g) < 0.7
    xt, masked = masking.mask_tokens(x0, t, 99, maskable=maskable, generator=g)
    assert not masked[~maskable].any()
    assert torch.equal(xt[~masked], x0[~masked])
    assert (xt[masked] == 99).all()
    rate = masked.sum(1) / maskable.sum(1)                      # ~350 trials a row
    se = (t * (1 - t) / maskable.sum(1)).sqrt()
    assert ((rate - t).abs() < 5 * se).all()


def test_sample_t_range_mean_and_stratified_spacing():
    g = torch.Generator().manual_seed(1)
    t = masking.sample_t(100_000, 0.2, 0.6, generator=g)
    assert t.min() >= 0.2 and t.max() <= 0.6
    assert t.mean().item() == pytest.approx(0.4, abs=4 * 0.4 / math.sqrt(12 * 100_000))
    s = masking.sample_t(8, 0.2, 0.6, stratified=True, generator=g).sort().values
    assert torch.allclose(s.diff(), torch.full((7,), 0.05), atol=1e-6)
    assert s.min() >= 0.2 and s.max() <= 0.6
    assert torch.equal(masking.sample_t(5, 0.3, 0.3), torch.full((5,), 0.3))


@pytest.mark.parametrize("t0,t1", [(0.6, 0.4), (-0.1, 0.5), (0.2, 1.5)])
def test_sample_t_rejects_bad_interval(t0, t1):
    with pytest.raises(ValueError):
        masking.sample_t(4, t0, t1)


def test_check_mask_id():
    with pytest.raises(ValueError, match="real token"):
        masking.check_mask_id(100, tokenizer_vocab=50257, model_vocab=50304)
    with pytest.raises(ValueError, match="outside"):
        masking.check_mask_id(60000, tokenizer_vocab=50257, model_vocab=50304)
    masking.check_mask_id(50257, tokenizer_vocab=50257, model_vocab=50304)
    # LLaDA: <|mdm_mask|> = 126336 is inside the tokenizer, as a special token text never encodes to
    masking.check_mask_id(126336, tokenizer_vocab=126349, model_vocab=126464, special={126081, 126336})
    with pytest.raises(ValueError, match="real token"):
        masking.check_mask_id(126336, tokenizer_vocab=126349, model_vocab=126464, special={126081})


def test_elbo_of_uniform_model_is_log_v():
    V = 37
    x0 = torch.randint(0, V, (4, 20))
    uniform = lambda x: torch.zeros(*x.shape, V)
    got = masking.elbo_nll(uniform, x0, mask_id=V - 1, n_t=16, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(math.log(V), rel=1e-6)


def test_elbo_equals_continuous_time_bound():
    # A model whose loss depends on how much is masked: CE(l) at each of the l
    # masked tokens. The continuous bound E_{t~U[0,1]} E_m[(1/t) sum_masked CE] / L
    # is computed by quadrature; the estimator, with n_t = L stratified draws,
    # visits every l in 1..L once and must match it exactly.
    L, V = 7, 2
    x0 = torch.zeros(1, L, dtype=torch.long)

    def model_fn(x):
        n_masked = (x == V).sum(1, keepdim=True).float().expand(x.shape)
        return torch.stack([2.0 - 0.6 * n_masked, torch.zeros_like(n_masked)], -1)
    ce = [math.log1p(math.exp(-(2.0 - 0.6 * l))) for l in range(L + 1)]
    tt = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:]
    integrand = sum(math.comb(L, l) * tt**l * (1 - tt)**(L - l) * l * ce[l] for l in range(1, L + 1)) / tt / L
    continuous = torch.trapezoid(integrand, tt).item()
    got = masking.elbo_nll(model_fn, x0, mask_id=V, n_t=L, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(continuous, rel=1e-5)
    assert got == pytest.approx(sum(ce[1:]) / L, rel=1e-6)


def test_elbo_respects_maskable_and_bins():
    V = 5
    x0 = torch.randint(0, V - 1, (3, 10))
    maskable = torch.zeros(3, 10, dtype=torch.bool)
    maskable[:, 4:] = True
    seen = []

    def model_fn(x):
        seen.append(x.clone())
        return torch.zeros(*x.shape, V)
    t, nll = masking.elbo_terms(model_fn, x0, V - 1, n_t=10, maskable=maskable)
    assert not (seen[0][:, :4] == V - 1).any()
    bins = masking.loss_per_t_bin(t, nll)
    assert len(bins) == 10 and all(b == pytest.approx(math.log(V)) for b in bins)


def test_elbo_in_chunks_is_the_same_bound():
    """The held-out evaluation runs its draws in chunks of the training micro-batch (its peak memory);
    the masks are drawn first, so every draw's term is the same."""
    torch.manual_seed(0)
    V, x0 = 11, torch.randint(0, 10, (3, 16))
    w = torch.randn(V, V)
    model_fn = lambda x: w[x] + 0.1 * (x == 10).float().cumsum(1)[..., None]
    whole = masking.elbo_terms(model_fn, x0, 10, n_t=5, generator=torch.Generator().manual_seed(4))
    for chunk in (1, 4, 7):
        parts = masking.elbo_terms(model_fn, x0, 10, n_t=5, generator=torch.Generator().manual_seed(4), chunk=chunk)
        assert torch.equal(parts[0], whole[0]) and torch.allclose(parts[1], whole[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dist,mean,std", [("beta", 0.34, 0.029), ("beta", 0.5, 0.15), ("logit-normal", 0.34, 0.5)])
def test_bell_shaped_t_has_its_mean_and_spread(dist, mean, std):
    """Issue 32: t ~ Beta (set by its mean and standard deviation) or logit-normal (logit t ~ N(logit mean,
    std^2): `mean` is its median), drawn as inverse CDFs of one uniform; stratified draws tile quantiles."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    t = masking.sample_t(n, dist=dist, mean=mean, std=std, generator=g)
    assert t.min() > 0 and t.max() < 1
    if dist == "beta":
        assert t.mean().item() == pytest.approx(mean, abs=4 * std / math.sqrt(n))
        assert t.std().item() == pytest.approx(std, rel=0.01)
    else:
        assert t.median().item() == pytest.approx(mean, abs=0.005)
        logit = torch.log(t / (1 - t))
        assert logit.std().item() == pytest.approx(std, rel=0.01)
    s = masking.sample_t(8, dist=dist, mean=mean, std=std, stratified=True, generator=g).sort().values
    u = masking.sample_t(8, stratified=True, generator=torch.Generator().manual_seed(1))
    assert (s.diff() > 0).all() and u.sort().values.diff().sub(1 / 8).abs().max() < 1e-6


def test_beta_cdf_against_its_closed_form_where_there_is_one():
    """Beta(2, 2): CDF 3t^2 - 2t^3. The tabulated inverse gives the exact quantiles to 1e-6."""
    mean, std = 0.5, math.sqrt(1 / 20)           # Beta(2, 2): mean 1/2, variance ab/((a+b)^2 (a+b+1)) = 1/20
    assert masking.beta_params(mean, std) == pytest.approx((2.0, 2.0))
    g = torch.Generator().manual_seed(3)
    t = masking.sample_t(5, dist="beta", mean=mean, std=std, generator=g).double()
    u = torch.rand(5, generator=torch.Generator().manual_seed(3)).double()
    assert torch.allclose(3 * t ** 2 - 2 * t ** 3, u, atol=1e-6)


@pytest.mark.parametrize("dist,mean,std,want", [("beta", 0.3, 0.4, "bell-shaped"), ("beta", 0.5, 0.6, "no Beta"),
                                                ("logit-normal", 1.2, 0.1, "0 < mean < 1"), ("gamma", 0.5, 0.1, "one of")])
def test_bad_t_distributions_are_refused(dist, mean, std, want):
    with pytest.raises(ValueError, match=want):
        masking.sample_t(4, dist=dist, mean=mean, std=std)
