import math
import os

import pytest
import torch

import masking
import model
from machinery import llada


def small_llada(**kw):
    """LLaDA's architecture (RMSNorm, SwiGLU, RoPE, untied, no bias) at toy size."""
    cfg = dict(vocab_size=40, mask_id=39, block_size=16, n_layer=2, n_head=2, d_model=16, mlp_hidden=24,
               norm="rmsnorm", mlp="swiglu", pos="rope", rope_theta=500000.0, bias=False, tie_weights=False)
    return model.ModelConfig(**{**cfg, **kw})


@pytest.mark.parametrize("preset", ["tiny", "parity", "wikitext-50m"])
def test_forward_shapes(preset):
    cfg = model.PRESETS[preset]
    m = model.Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, min(cfg.block_size, 24)))
    assert m(idx).shape == (2, idx.shape[1], cfg.vocab_size)
    out_mask = torch.zeros_like(idx, dtype=torch.bool)
    out_mask[0, 3] = out_mask[1, 0] = True
    full = m(idx)
    assert torch.allclose(m(idx, output_mask=out_mask), full[out_mask], atol=1e-5)


def test_llada_8b_parameter_count_on_meta():
    with torch.device("meta"):
        m = model.Transformer(model.PRESETS["llada-8b"])
    V, d, n_layer, hidden = 126464, 4096, 32, 12288
    per_block = 4 * d * d + 3 * d * hidden + 2 * d       # q,k,v,out; gate,up,down; two RMSNorm scales
    assert m.num_params() == 2 * V * d + n_layer * per_block + d == 8_015_581_184
    assert m.cfg.mask_id == 126336 and m.cfg.block_size == 4096
    assert all(p.is_meta for p in m.parameters())


def test_wikitext_preset_is_about_50m():
    m = model.Transformer(model.PRESETS["wikitext-50m"])
    assert 45e6 < m.num_params() < 55e6


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    rq, rk = model.rope(q, 100.0), model.rope(k, 100.0)
    scores = rq[0, 0] @ rk[0, 0].T                               # (12, 12)
    for offset in (0, 1, 5):
        diag = torch.diagonal(scores, offset)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-4)
    # rotate-half layout: feature i pairs with i + hd/2 and turns by pos * theta^(-2i/hd)
    x = torch.zeros(1, 1, 4, 8)
    x[..., 0] = 1.0
    pos, ang = 3, 3 * 100.0 ** (-0 / 8)
    out = model.rope(x, 100.0)[0, 0, pos]
    assert out[0].item() == pytest.approx(math.cos(ang), abs=1e-6)
    assert out[4].item() == pytest.approx(math.sin(ang), abs=1e-6)


def test_rmsnorm_is_fp32_and_matches_formula():
    n = model.RMSNorm(6, 1e-5)
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    want = (x.float() / (x.float().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).to(torch.bfloat16)
    assert torch.equal(n(x), want)


def test_attention_is_bidirectional():
    m = model.Transformer(model.PRESETS["tiny"]).eval()
    idx = torch.randint(0, 15, (1, 10))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 15
    assert not torch.allclose(m(idx)[0, 0], m(changed)[0, 0])   # position 0 sees the last token


def test_optimizer_groups_skip_norms_and_biases():
    m = model.Transformer(model.PRESETS["tiny"])
    opt = m.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()


def test_flops_and_mfu():
    m = model.Transformer(model.PRESETS["wikitext-50m"])
    cfg = m.cfg
    head = cfg.vocab_size * cfg.d_model
    d, h = cfg.d_model, cfg.mlp_hidden
    per_block = 4 * d * d + 2 * d * h + (4 * d + h + d) + 2 * 2 * d     # weights, biases, two LayerNorms
    body = cfg.n_layer * per_block + 2 * d                              # + final LayerNorm
    assert m.flops_per_token(150) == 6 * body + 6 * head + 12 * cfg.n_layer * d * 150
    assert m.flops_per_token(150, head_fraction=0.1) < m.flops_per_token(150)
    assert model.estimate_mfu(1e9, 1000.0, 1e13) == pytest.approx(0.1)
    assert model.estimate_mfu(1e9, 1000.0, None) is None


def test_peak_flops_tell_the_h100s_apart():
    assert model.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12          # SXM
    assert model.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert model.peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert model.peak_flops_of("NVIDIA H200") == 989e12 and model.peak_flops_of("Some GPU") is None


def test_bad_config_is_one_line_error():
    with pytest.raises(ValueError, match="mask_id"):
        model.ModelConfig(vocab_size=10, mask_id=10)
    with pytest.raises(ValueError, match="divisible"):
        model.ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        model.get_config("gpt-5")
    m = model.Transformer(model.PRESETS["tiny"])
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_safetensors_round_trip_in_llada_format(tmp_path):
    torch.manual_seed(0)
    src = model.Transformer(small_llada())
    llada.save_safetensors(src, tmp_path, max_shard_bytes=20_000)           # several shards
    import json
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for key in ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
                *(f"model.transformer.blocks.1.{n}.weight" for n in
                  ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"))]:
        assert key in index["weight_map"]
    assert len(index["weight_map"]) == 3 + 2 * 9
    with torch.device("meta"):
        dst = model.Transformer(small_llada())
    llada.load_safetensors(dst, str(tmp_path))
    idx = torch.randint(0, 40, (2, 16))
    assert torch.equal(src(idx), dst(idx))


def test_safetensors_loader_reports_mismatch(tmp_path):
    llada.save_safetensors(model.Transformer(small_llada()), tmp_path)
    with pytest.raises(ValueError, match="missing keys"):
        llada.load_safetensors(model.Transformer(small_llada(n_layer=3)), str(tmp_path))
    with pytest.raises(ValueError, match="shape mismatches"):
        llada.load_safetensors(model.Transformer(small_llada(mlp_hidden=32)), str(tmp_path))
    os.remove(tmp_path / "model.safetensors.index.json")
    with pytest.raises(ValueError, match="neither"):
        llada.load_safetensors(model.Transformer(small_llada()), str(tmp_path))


def test_tiny_model_learns_with_md_loss():
    # Sequences x_i = (a + i) mod 15: any visible token reveals the rest, so a
    # model trained with the MD loss must drive its loss far below log(15).
    torch.manual_seed(0)
    m = model.Transformer(model.PRESETS["tiny"])
    opt = m.configure_optimizer(lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(200):
        x0 = (torch.randint(0, 15, (64, 1), generator=g) + torch.arange(16)) % 15
        t = masking.sample_t(64, 0.0, 1.0, stratified=True, generator=g)
        xt, masked = masking.mask_tokens(x0, t, m.cfg.mask_id, generator=g)
        loss = masking.md_loss(m(xt, output_mask=masked), x0, masked, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first > 2.0 and last < 0.2 * first, (first, last)


def test_transfer_schedule():
    s = model.transfer_schedule(torch.tensor([10, 3, 0]), 4)
    assert s.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_generate_fills_every_mask_and_keeps_prompt():
    torch.manual_seed(0)
    m = model.Transformer(model.PRESETS["tiny"]).eval()
    prompt = torch.randint(0, 15, (2, 5))
    for kw in (dict(), dict(temperature=1.0), dict(cfg_scale=1.0), dict(remasking="random")):
        out = model.generate(m, prompt, mask_id=15, gen_length=8, steps=4, block_length=4, **kw)
        assert out.shape == (2, 13)
        assert torch.equal(out[:, :5], prompt)
        assert not (out == 15).any()


def test_generate_recovers_an_oracle_answer_in_confidence_order():
    # An oracle that knows the answer, more confident at later positions: the
    # sampler must reproduce the answer, unmasking one token per step, right to left
    # inside each block.
    target = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    order = []

    def oracle(x, output_mask=None, attention_mask=None):
        order.append((x == 15).clone())
        logits = torch.zeros(*x.shape, 16)
        logits[0, torch.arange(8), target[0]] = torch.arange(8, dtype=torch.float) + 1.0
        return logits if output_mask is None else logits[output_mask]
    out = model.generate(oracle, target[:, :2], mask_id=15, gen_length=6, steps=6, block_length=3)
    assert torch.equal(out, target)
    first_unmasked = [(a & ~b).nonzero()[:, 1].tolist() for a, b in zip(order, order[1:])]
    assert first_unmasked == [[4], [3], [2], [7], [6]]


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(pos):
    torch.manual_seed(0)
    m = model.Transformer(small_llada(pos=pos, vocab_size=40, block_size=32, init_std=0.5)).double().eval()
    prompts = [torch.randint(0, 38, (n,)) for n in (3, 7, 5)]
    P, pad = max(len(p) for p in prompts), 38                       # pad with any id: it is never attended to
    batch = torch.stack([torch.cat([torch.full((P - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(P - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    kw = dict(mask_id=39, gen_length=8, steps=8, block_length=4)
    together = model.generate(m, batch, attention_mask=mask, **kw)[:, P:]
    alone = [model.generate(m, p[None], **kw)[0, len(p):] for p in prompts]
    assert all(torch.equal(together[i], alone[i]) for i in range(3))
    # without the mask the padding changes what the model sees (so the mask is doing the work)
    unmasked = model.generate(m, batch, **kw)[:, P:]
    assert not all(torch.equal(unmasked[i], alone[i]) for i in range(3))


def eos_oracle(eos_conf, word_conf):
    """Logits (V = 16, MASK 15, EOS 14, EOT 13) that prefer EOS at position 2 with logit eos_conf,
    and token 5 elsewhere with logit word_conf."""
    def fn(x, output_mask=None, attention_mask=None):
        logits = torch.zeros(*x.shape, 16)
        logits[..., 5] = word_conf
        logits[:, 2, 14] = eos_conf
        return logits[output_mask]
    return fn


def test_logits_eos_inf_never_predicts_eos():
    prompt = torch.tensor([[1, 2]])
    kw = dict(mask_id=15, gen_length=4, steps=4, block_length=4, eos_id=14, eot_id=13)
    assert model.generate(eos_oracle(9.0, 3.0), prompt, **kw)[0, 2] == 14
    out = model.generate(eos_oracle(9.0, 3.0), prompt, logits_eos_inf=True, **kw)
    assert (out[0, 2:] != 14).all() and out[0, 2] == 5


def test_confidence_eos_eot_inf_unmasks_eos_last():
    prompt = torch.tensor([[1, 2]])
    order = []
    base = eos_oracle(9.0, 3.0)

    def recording(x, output_mask=None, attention_mask=None):
        order.append((x[0] == 15).clone())
        return base(x, output_mask)
    kw = dict(mask_id=15, gen_length=4, steps=4, block_length=4, eos_id=14, eot_id=13)
    model.generate(recording, prompt, **kw)
    assert (order[0] & ~order[1]).nonzero()[:, 0].tolist() == [2]      # EOS is the most confident: first
    order.clear()
    out = model.generate(recording, prompt, confidence_eos_eot_inf=True, **kw)
    unmasked_last = (order[-1] & ~(out[0] == 15)).nonzero()[:, 0].tolist()
    assert unmasked_last == [2] and out[0, 2] == 14                   # still EOS, but picked last


def eos_heavy(pos="rope", seed=0):
    """A random small LLaDA whose EOS (37) and EoT (36) logits are often the largest: the case where
    confidence_eos_eot_inf leaves several picks at exactly 0 confidence. MASK (39) is never predicted."""
    torch.manual_seed(seed)
    m = model.Transformer(small_llada(pos=pos, vocab_size=40, block_size=40, init_std=0.5)).double().eval()

    def fn(x, output_mask=None, attention_mask=None):
        logits = m(x, output_mask=output_mask, attention_mask=attention_mask).clone()
        logits[..., [36, 37]] += 2.5
        logits[..., 39] = -math.inf
        return logits
    return fn


def llada_reference(fn, prompt, *, gen_length, steps, block_length, mask_id, eos_id, eot_id, logits_eos_inf=False,
                    confidence_eos_eot_inf=False):
    """LLaDA's generate.py at temperature 0 with low-confidence remasking, written out plainly: the
    model on the whole sequence, EOS options where LLaDA applies them, a top-k per row. One change:
    LLaDA's torch.topk leaves the order of equal confidences unspecified; here the leftmost wins."""
    x = torch.cat([prompt, torch.full((len(prompt), gen_length), mask_id)], 1)
    P, blocks = prompt.shape[1], gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        hi = P + (b + 1) * block_length
        n = (x[:, P + b * block_length:hi] == mask_id).sum(1).tolist()
        for i in range(per_block):
            masked = x == mask_id
            logits = fn(x).double()
            if logits_eos_inf:
                logits[:, :, eos_id] = -math.inf
            x0 = logits.argmax(-1)
            if confidence_eos_eot_inf:           # at temperature 0 LLaDA's noised logits are these logits
                logits[:, :, eos_id] = logits[:, :, eot_id] = -math.inf
            p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            p[:, hi:] = -math.inf
            confidence = torch.where(masked, p, -math.inf)
            for j in range(len(x)):
                k = n[j] // per_block + (i < n[j] % per_block)
                order = sorted(range(x.shape[1]), key=lambda c: -confidence[j, c].item())   # stable: leftmost
                for c in order[:k]:
                    x[j, c] = x0[j, c]
    return x


EOS_OPTIONS = [dict(), dict(logits_eos_inf=True), dict(confidence_eos_eot_inf=True),
               dict(logits_eos_inf=True, confidence_eos_eot_inf=True)]


@pytest.mark.parametrize("options", EOS_OPTIONS)
def test_generate_matches_llada_token_for_token(options):
    fn = eos_heavy()
    prompt = torch.randint(0, 35, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(gen_length=12, steps=12, block_length=4, mask_id=39, eos_id=37, eot_id=36, **options)
    ours = model.generate(fn, prompt, **kw)
    assert torch.equal(ours, llada_reference(fn, prompt, **kw))
    picked = ours[:, 5:]
    if not options.get("logits_eos_inf"):
        assert ((picked == 37) | (picked == 36)).float().mean() > 0.3      # EOS/EoT often win, as intended


@pytest.mark.parametrize("options", EOS_OPTIONS)
def test_left_padded_batch_equals_alone_under_every_eos_option(options):
    fn = eos_heavy(pos="rope", seed=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 35, (n,), generator=g) for n in (2, 9, 5, 6)]
    P = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([torch.full((P - len(p),), 37), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(P - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    kw = dict(mask_id=39, gen_length=16, steps=16, block_length=8, eos_id=37, eot_id=36, **options)
    together = model.generate(fn, batch, attention_mask=mask, **kw)[:, P:]
    for i, p in enumerate(prompts):
        assert torch.equal(together[i], model.generate(fn, p[None], **kw)[0, len(p):]), i
