"""fsdp.py, the LLaDA-8B machinery, piece by piece in a world of one process (gloo, CPU): the FSDP2
build and its sharded init, export, tokenizer checks, the learning-rate schedule and the plan's
arithmetic. The whole loop under torchrun is tested in test_pretrain_8b.py and test_sft_eval.py."""
import json
import time

import pytest
import torch
import torch.distributed as dist

import fsdp
import model as model_lib
from pretrain_8b import PretrainConfig


class world_of_one:
    def __init__(self, tmp_dir):
        self.init = f"file://{tmp_dir}/pg_{time.time_ns()}"

    def __enter__(self):
        dist.init_process_group("gloo", init_method=self.init, rank=0, world_size=1)

    def __exit__(self, *exc):
        dist.destroy_process_group()


def test_export_of_an_fsdp_model_gives_the_same_logits(tmp_path):
    tok = fsdp.byte_tokenizer()
    ids = fsdp.token_ids(tok)
    mc = fsdp.model_config("tiny", ids)
    x = torch.randint(0, 256, (2, 20))
    with world_of_one(tmp_path):
        m, _ = fsdp.build(mc, PretrainConfig(seed=3), "cpu", compile_model=False, ac="none")
        want = m(x).detach()
        m.reshard()
        fsdp.export(m, str(tmp_path / "export"), tok, ids, "float32")
    back = model_lib.Transformer(model_lib.config_from_json(json.load(open(tmp_path / "export" / "config.json"))))
    model_lib.load_safetensors(back, str(tmp_path / "export"))
    assert torch.allclose(back(x), want, atol=1e-6)
    # and the sharded init is the unsharded one: the same weights whatever the world size
    ref = model_lib.Transformer(mc)
    ref.init_weights(seed=3)
    assert torch.allclose(ref(x), want, atol=1e-6)


def test_tokenizer_checks():
    from tokenizers import Tokenizer, models
    ids = dict(eos=5, mask=6, vocab=200_000, special={5, 6}, bos=None)
    with pytest.raises(ValueError, match="200,000 ids"):
        fsdp.model_config("llada-8b", ids)
    # <|mdm_mask|> a real (non-special) token of the vocabulary: MASK would collide with text
    tok = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1, "<|mdm_mask|>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="is a real token"):
        fsdp.model_config("tiny", fsdp.token_ids(tok))


def test_wsd_schedule():
    cfg = PretrainConfig(max_steps=100, warmup=10, lr=1.0, min_lr=0.1, decay_frac=0.2)
    lrs = [fsdp.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == 1.0 and lrs[99] == pytest.approx(1.0 + 19 / 20 * (0.1 - 1.0))
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_plan_arithmetic_of_the_8b_run():
    out = fsdp.plan(PretrainConfig(), 8, 0.4)
    # FLOPs per token: 6 N (head on half the positions) + bidirectional attention 12 n_layer d L
    body, head = 8_015_581_184 - 2 * 126464 * 4096, 126464 * 4096
    assert out["flops_per_token"] == 6 * (body + 0.5 * head) + 12 * 32 * 4096 * 4096
    assert out["gib"]["params"] == pytest.approx(4 * 8_015_581_184 / 8 / 2**30)
    out = fsdp.plan(PretrainConfig(), 8, 0.4, paper_hours=20)
    assert 0.3 < out["paper_hours_mfu"] < 1.0
