"""plan.py: the memory a LLaDA-8B step needs, traced at full size on fake tensors (no GPU, almost no
memory), beside the arithmetic; --ac auto deciding from the trace; the --dry-run that prints both."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import ROOT

import model as model_lib
from machinery import plan
from pretrain_8b import PretrainConfig

GIB = 2 ** 30


def test_one_step_of_llada_8b_traced_at_full_size_on_fake_tensors():
    """Issue 24.10: Table 4's run on 8 GPUs (micro-batch 2 x 4096, bf16 compute, fp32 master and
    reduction), full checkpointing: the traced peak holds exactly this rank's eighth of the fp32
    parameters, gradients and AdamW's two moments, and activations, all below the arithmetic's total
    (an upper bound: it adds peaks that do not coincide)."""
    cfg = PretrainConfig()
    mc = plan.plan_model_config(cfg)
    n = plan.meta_model(mc).num_params()
    traced = plan.trace(mc, cfg.micro_batch, cfg.block_size, 8, "full")
    assert not dist.is_initialized()                               # the fake process group is gone again
    assert traced["sharded_param"] == pytest.approx(4 * n / 8 / GIB, rel=1e-3)
    assert traced["sharded_grad"] == pytest.approx(4 * n / 8 / GIB, rel=1e-3)
    assert traced["optstate"] == pytest.approx(8 * n / 8 / GIB, rel=1e-3)
    assert traced["total"] == pytest.approx(sum(v for k, v in traced.items() if k != "total"), rel=1e-6)
    _, totals, _ = plan.memory_gib(cfg, 8, plan.meta_model(mc))
    assert 20 < traced["total"] < totals["full"] - plan.ALLOWANCE_GIB


def test_ac_auto_decides_on_the_trace_cheapest_first(monkeypatch):
    """--ac auto traces none, then selective, then full, and takes the first whose peak plus the
    allowance fits 90% of --gpu-gib; on a CPU it is none, an explicit --ac is kept."""
    peaks = {"none": 77.9, "selective": 55.7, "full": 31.7}
    traced = []

    def fake_trace(mc, micro_batch, block_size, world, policy):
        traced.append(policy)
        return {"total": peaks[policy]}
    monkeypatch.setattr(plan, "trace", fake_trace)
    assert plan.choose_ac(PretrainConfig(gpu_gib=80), 8, "cuda:0") == "selective" and traced == ["none", "selective"]
    traced.clear()
    assert plan.choose_ac(PretrainConfig(gpu_gib=141), 8, "cuda:0") == "none" and traced == ["none"]
    assert plan.choose_ac(PretrainConfig(gpu_gib=40), 8, "cuda:0") == "full"
    assert plan.choose_ac(PretrainConfig(gpu_gib=30), 8, "cuda:0") == "full"          # nothing fits: the least
    assert plan.choose_ac(PretrainConfig(), 8, "cpu") == "none"
    assert plan.choose_ac(PretrainConfig(ac="every-4"), 8, "cuda:0") == "every-4"


def test_dry_run_prints_the_trace_beside_the_arithmetic():
    """The plan of a small LLaDA-shaped model: the traced peak of the policy asked for, by category."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_8b.py"), "--dry-run", "--preset", "tiny",
                        "--ac", "selective", "--world-size", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "traced on fake tensors: one step of 2 ranks" in r.stdout
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith("--ac selective") and "traced peak" in l)
    assert "arithmetic" in line and "sharded_param" in line
    assert "--ac auto picks" in r.stdout


def test_a_trace_in_a_child_process_gives_the_in_process_trace():
    """A run already holds a process group: its --ac auto traces in a child process, the same numbers."""
    mc = model_lib.ModelConfig(vocab_size=64, mask_id=63, block_size=32, n_layer=2, n_head=2, d_model=32,
                               mlp_hidden=48, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_weights=False)
    here = plan.trace(mc, 2, 32, 2, "none")
    child = plan.trace_in_child(mc, 2, 32, 2, "none")
    assert child == pytest.approx(here)
