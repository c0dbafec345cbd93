"""machinery/fsdp.py, the LLaDA-8B machinery, piece by piece in a world of one process (gloo, CPU): the
FSDP2 build and its sharded init, export, tokenizer checks, the learning-rate schedule, the plan's
arithmetic, and pretrain_8b.py's step driven in-process (non-finite steps, clipping). The whole loop
under torchrun is tested in test_pretrain_8b.py and test_sft_eval.py."""
import json
import threading
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import masking
import model as model_lib
from machinery import dclm, distributed, fsdp, llada, optim, plan
from pretrain_8b import PretrainConfig
from test_model import small_llada


class world_of_one:
    def __init__(self, tmp_dir):
        self.init = f"file://{tmp_dir}/pg_{time.time_ns()}"

    def __enter__(self):
        dist.init_process_group("gloo", init_method=self.init, rank=0, world_size=1)

    def __exit__(self, *exc):
        dist.destroy_process_group()


def test_export_of_an_fsdp_model_gives_the_same_logits(tmp_path):
    tok = llada.byte_tokenizer()
    ids = llada.token_ids(tok)
    mc = llada.model_config("tiny", ids)
    x = torch.randint(0, 256, (2, 20))
    with world_of_one(tmp_path):
        m, _ = fsdp.build(mc, PretrainConfig(seed=3), "cpu", compile_model=False, ac="none")
        want = m(x).detach()
        m.reshard()
        fsdp.export(m, str(tmp_path / "export"), tok, ids, "float32")
    back = model_lib.Transformer(llada.config_from_json(json.load(open(tmp_path / "export" / "config.json"))))
    llada.load_safetensors(back, str(tmp_path / "export"))
    assert torch.allclose(back(x), want, atol=1e-6)
    # and the sharded init is the unsharded one: the same weights whatever the world size
    ref = model_lib.Transformer(mc)
    ref.init_weights(seed=3)
    assert torch.allclose(ref(x), want, atol=1e-6)


def test_tokenizer_checks():
    from tokenizers import Tokenizer, models
    ids = dict(eos=5, mask=6, vocab=200_000, special={5, 6}, bos=None)
    with pytest.raises(ValueError, match="200,000 ids"):
        llada.model_config("llada-8b", ids)
    # <|mdm_mask|> a real (non-special) token of the vocabulary: MASK would collide with text
    tok = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1, "<|mdm_mask|>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="is a real token"):
        llada.model_config("tiny", llada.token_ids(tok))


def test_wsd_schedule():
    cfg = PretrainConfig(max_steps=100, warmup=10, lr=1.0, min_lr=0.1, decay_frac=0.2)
    lrs = [optim.lr_at(s, cfg.lr, warmup=cfg.warmup, max_steps=cfg.max_steps, schedule=cfg.schedule,
                        min_lr=cfg.min_lr, decay_frac=cfg.decay_frac) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == 1.0 and lrs[99] == pytest.approx(1.0 + 19 / 20 * (0.1 - 1.0))
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_plan_arithmetic_of_the_8b_run():
    out = plan.plan(PretrainConfig(), 8, 0.4, traced=False)
    # FLOPs per token: 6 N (head on half the positions) + bidirectional attention 12 n_layer d L
    body, head = 8_015_581_184 - 2 * 126464 * 4096, 126464 * 4096
    assert out["flops_per_token"] == 6 * (body + 0.5 * head) + 12 * 32 * 4096 * 4096
    assert out["gib"]["params"] == pytest.approx(4 * 8_015_581_184 / 8 / 2**30)
    out = plan.plan(PretrainConfig(), 8, 0.4, paper_hours=20, traced=False)
    assert 0.3 < out["paper_hours_mfu"] < 1.0


def test_the_plan_counts_every_part_and_picks_the_checkpointing():
    """Table 4's run on 8 GPUs: FSDP's unsharded gradients and reduce buffers, the worst-t logits and a
    fixed allowance are counted; activations per policy by hand; --ac auto picks the cheapest policy
    that fits 90% of the card (the arithmetic's totals; --ac auto itself decides on the trace)."""
    out = plan.plan(PretrainConfig(), 8, 0.4, traced=False)
    parts, totals, gib = out["gib"], out["total_gib"], 2.0 ** 30
    d, h, V, tok, layers = 4096, 12288, 126464, 2 * 4096, 32
    assert parts["grads"] == parts["params"] and parts["adam"] == 2 * parts["params"]
    assert parts["logits_t1"] == pytest.approx(12 * tok * V / gib) and parts["overhead"] == 3.0
    assert parts["reduce_buffers"] > 0 and parts["gathered"] > 0
    fixed = sum(parts.values())
    assert totals["none"] == pytest.approx(fixed + layers * 2 * (14 * d + 4 * h) * tok / gib)
    assert totals["full"] == pytest.approx(fixed + (layers * 2 * d + 2 * (14 * d + 4 * h)) * tok / gib)
    assert totals["none"] > totals["every-2"] > totals["selective"] > totals["full"]
    assert out["evaluation_gib"] < totals["full"]      # chunked, no gradients: below any training peak
    assert totals["none"] > 0.9 * 80 > totals["selective"]
    assert plan.choose_ac(PretrainConfig(), 8, "cpu") == "none"
    assert plan.choose_ac(PretrainConfig(ac="every-4"), 8, "cuda:0") == "every-4"



def train_tiny(tmp_path, name, max_steps, poison_call=None, **settings):
    """pretrain_8b.train in this process (a world of one) on the tiny model and a small corpus, the CE of
    one micro-batch (call number `poison_call`: four micro-batches a step) made NaN. Returns (the
    weights after the loop, its error message or None)."""
    from pretrain_8b import PRESETS, train
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(f"document {i}: " + " ".join(["alpha", "beta", "gamma"][i % 3:]) * (i % 7 + 2)
                                    for i in range(300)))
    cfg = replace(PretrainConfig(**PRESETS["tiny"]), data=str(corpus), max_steps=max_steps, log_every=4,
                  eval_every=100, save_every=100, warmup=1, random_length_prob=0.0, **settings)
    calls, built, real_ce, real_build = [], [], masking.token_ce, fsdp.build

    def ce_fn(logits, targets):
        calls.append(1)
        ce = real_ce(logits, targets)
        return ce * float("nan") if len(calls) == poison_call else ce
    error = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masking, "token_ce", ce_fn)
        mp.setattr(fsdp, "build", lambda *args, **kwargs: _built(real_build, built, *args, **kwargs))  # keep the model
        try:
            train(cfg, str(tmp_path / name))
        except ValueError as e:
            error = str(e)
    weights = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in built[0].named_parameters()}
    return weights, error


def _built(real_build, built, *args, **kwargs):
    m, opt = real_build(*args, **kwargs)
    built.append(m)
    return m, opt


def test_a_non_finite_step_never_reaches_the_weights(tmp_path):
    """Step 4's loss is NaN (in one micro-batch of four): the fused AdamW skips the step on the device
    (no host sync in the step), the check at step 4 stops the run in one line before any checkpoint,
    and the weights are exactly those after step 3."""
    after3, error = train_tiny(tmp_path, "clean", max_steps=3)
    assert error is None
    stopped, error = train_tiny(tmp_path, "nan", max_steps=6, poison_call=4 * 3 + 2)
    assert "became nan by step 4" in error and "did not reach the weights" in error
    assert all(torch.equal(stopped[n], after3[n]) for n in after3)
    assert fsdp.checkpoints(str(tmp_path / "nan")) == []             # nothing saved: the run stopped at step 4
    # and the test can fail: without the poison, step 4 moves the weights
    moved, _ = train_tiny(tmp_path, "four", max_steps=4)
    assert not all(torch.equal(moved[n], after3[n]) for n in after3)


def test_fsdp_units_as_torchtitan_shards_them(tmp_path):
    """LLaDA's layout (untied head): the embedding is a unit of its own; the final norm and the head are
    one unit that stays gathered from forward to backward, while the blocks reshard after their forward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    mc = model_lib.ModelConfig(vocab_size=40, mask_id=39, block_size=16, n_layer=2, n_head=2, d_model=16,
                               mlp_hidden=24, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                               tie_weights=False)
    with world_of_one(tmp_path):
        m, _ = fsdp.build(mc, PretrainConfig(), "cpu", compile_model=False, ac="none")
        t = m.transformer
        assert isinstance(t.wte, FSDPModule) and all(isinstance(b, FSDPModule) for b in t.blocks)
        assert t.ff_out._get_fsdp_state() is t.ln_f._get_fsdp_state()       # one unit of two modules
        assert t.wte._get_fsdp_state() is not m._get_fsdp_state()
        m(torch.randint(0, 39, (2, 16)))                     # forward, with gradients: backward to come
        assert not isinstance(t.ff_out.weight, DTensor) and not isinstance(t.ln_f.weight, DTensor)
        assert all(isinstance(p, DTensor) for p in t.blocks.parameters())


def test_random_length_steps_leave_the_compiled_blocks_static():
    """Issue 17.2: LLaDA's 1% random-length steps (and ragged evaluation chunks) run eagerly, so the
    compiled blocks keep the one static graph of the full length: no recompilation, no dynamic
    graph serving the other 99% of steps. Without eager_unless the short step would recompile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = model_lib.ModelConfig(vocab_size=40, mask_id=39, block_size=16, n_layer=2, n_head=2, d_model=16,
                                mlp_hidden=24, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                                tie_weights=False)
    m = fsdp.apply_ac(model_lib.Transformer(cfg), "selective", compile_blocks=True)
    full, short = torch.randint(0, 39, (2, 16)), torch.randint(0, 39, (2, 11))
    m(full).square().mean().backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        with fsdp.eager_unless(False):
            m(short).square().mean().backward()
        m(full).square().mean().backward()
        with pytest.raises(RuntimeError, match="recompile"):
            m(short)
    torch._dynamo.reset()


def test_prefetch_hands_over_batches_in_order_and_errors_to_the_main_thread(tmp_path):
    """Issue 17.3: the next batch is drawn on a thread while this step computes. Each batch comes
    with the data position right after it (what a checkpoint at that step must save), not the
    position after the batch drawn ahead; an error on the thread is raised on the main thread."""
    class Slot:
        pos = 0

        def data_state(self):
            return {"pos": self.pos}

    slot, drawn_ahead = Slot(), threading.Event()

    def batches(step):
        slot.pos = step + 1
        if step == 3:
            drawn_ahead.set()
            raise ValueError("the data ran out")
        return [step]

    with world_of_one(tmp_path):
        feed = dclm.Prefetch(batches, {0: slot}, 1, 5, distributed.World())
        assert feed.next() == ([1], {0: {"pos": 2}})
        assert drawn_ahead.wait(timeout=60) and slot.pos == 4      # the thread has drawn ahead, up to the error
        assert feed.next() == ([2], {0: {"pos": 3}})
        with pytest.raises(ValueError, match="the data ran out"):
            feed.next()


# ----------------------------------------------------------------------------- parallelize (moved out of model.py)

@pytest.mark.parametrize("policy,compiled", [("full", False), ("selective", False), ("every-2", False),
                                             ("selective", True)])
def test_activation_checkpointing_policies_give_the_same_gradients(policy, compiled):
    """Recomputing (all of a block, or all but its matmuls and attention) changes no number; with
    compile, the checkpointed forward is compiled (torchtitan's order). Parameter names stay."""
    torch.manual_seed(0)
    a = model_lib.Transformer(small_llada(n_layer=3))
    b = model_lib.Transformer(small_llada(n_layer=3))
    b.load_state_dict(a.state_dict())
    fsdp.apply_ac(b, policy, compile_blocks=compiled)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    idx = torch.randint(0, 39, (2, 12))
    for m in (a, b):
        m(idx).square().mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5)


def test_ac_modes():
    assert fsdp.ac_modes("every-2", 5) == ["full", None, "full", None, "full"]
    assert fsdp.ac_modes("selective", 2) == ["selective"] * 2 and fsdp.ac_modes("none", 2) == [None, None]
    with pytest.raises(ValueError, match="every-N"):
        fsdp.ac_modes("every-0", 4)


def test_fsdp2_wraps_and_matches_unsharded(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = model_lib.Transformer(small_llada())
        m = model_lib.Transformer(small_llada())
        m.load_state_dict(ref.state_dict())
        fsdp.apply_fsdp(m, mixed_precision=False)
        idx = torch.randint(0, 40, (2, 16))
        assert torch.allclose(m(idx), ref(idx), atol=1e-6)
        m(idx).sum().backward()
        ref(idx).sum().backward()
        g = m.transformer.blocks[0].q_proj.weight.grad.full_tensor()
        assert torch.allclose(g, ref.transformer.blocks[0].q_proj.weight.grad, atol=1e-5)
    finally:
        dist.destroy_process_group()




def test_grad_clip_0_means_never_not_zero_gradients(tmp_path):
    """Issue 24.1: --grad-clip 0 ("never") trains exactly as an unreachable clip does; clip_grad_norm_
    with max_norm 0 itself multiplies every gradient by 0 (only weight decay would move the weights)."""
    never, _ = train_tiny(tmp_path, "never", max_steps=3, grad_clip=0.0)
    huge, _ = train_tiny(tmp_path, "huge", max_steps=3, grad_clip=1e9)
    assert all(torch.equal(never[n], huge[n]) for n in never)
    tight, _ = train_tiny(tmp_path, "tight", max_steps=3, grad_clip=1e-3)
    assert not all(torch.equal(never[n], tight[n]) for n in never)
    g = [torch.nn.Parameter(torch.ones(3))]
    g[0].grad = torch.full((3,), 2.0)
    assert optim.clip_gradients(g, 0).item() == pytest.approx(12 ** 0.5) and g[0].grad.tolist() == [2.0] * 3
