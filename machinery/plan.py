"""
How much a LLaDA-8B run needs and how fast it goes (pretrain_8b.py and sft_8b.py --dry-run,
--ac auto, --benchmark; wikitext.py's --benchmark times its steps with time_steps):

    memory_gib  the arithmetic: bytes per part (parameters, gradients, AdamW, gathered units,
                reduce buffers, the t = 1 logits, an allowance) and activations per checkpointing policy
    trace       one real optimizer step of the configured model at full size (two micro-batches
                accumulated, clip), traced on fake tensors (FakeTensorMode) with a fake process
                group of --world-size ranks under FSDP2's FSDPMemTracker: the peak by category, per
                policy, with no GPU and no memory
    choose_ac   --ac auto: the cheapest policy whose traced peak plus the allowance fits the GPU
    plan        --dry-run: all of it printed, with FLOPs and time at a given MFU
    benchmark   --benchmark: timed steps of full-width blocks on the GPUs present

The trace runs the step at the worst t (t = 1: every position through the 126k-token head; the
head's boolean gather has data-dependent shapes the tracker cannot follow). Its optimizer is
foreach AdamW and its state exists before the traced step (one untraced step first), and the
peak is taken over the forward/backward passes and the clip: the run's fused AdamW (CUDA)
updates in place, without the foreach temporaries, and the fake CPU kernel of fused AdamW
reports its state many times too large. The clip is traced per tensor: on fake DTensors the
foreach clip reports 13 GiB of copies (at 8B) that the in-place CUDA kernels do not make.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

import masking
import model as model_lib
from machinery import distributed, fsdp, llada
from machinery.cli import UserError, check_positive, user_input
from machinery.optim import clip_gradients

GIB = 2.0 ** 30
ALLOWANCE_GIB = 3.0      # CUDA context, NCCL buffers, fragmentation: what no trace of tensors sees
POLICIES = ("none", "selective", "full")     # --ac auto's candidates, cheapest recomputation first


def plan_model_config(cfg, model_cfg=None):
    """The model a run would build (its vocabulary sized as the run sizes it), or `model_cfg` itself."""
    if model_cfg is not None:
        return model_cfg
    with user_input():
        mc = model_lib.get_config(cfg.model, block_size=cfg.block_size)
    if not cfg.model.startswith("llada"):
        mc = replace(mc, vocab_size=256 + len(llada.SPECIALS), mask_id=257)
    return mc


def meta_model(mc):
    with torch.device("meta"):
        return model_lib.Transformer(mc)


# ----------------------------------------------------------------------------- arithmetic

def memory_gib(cfg, world, m):
    """Peak GiB per GPU by part, in total per activation-checkpointing policy (an upper bound:
    the parts' peaks are added although not all coincide), and the evaluation's. Bytes per token and block kept for
    backward: ~2(14d + 4h) without checkpointing (bf16 tensors, fp32 norm copies, flash attention
    keeps no L x L scores); 2(7d + 2h) selective (matmul and attention outputs, the block input);
    2d full (the block input) plus one block recomputed at a time."""
    mc = m.cfg
    n, d, h, V, nl = m.num_params(), mc.d_model, mc.mlp_hidden, mc.vocab_size, mc.n_layer
    tok = cfg.micro_batch * cfg.block_size
    head = V * d * (1 if mc.tie_weights else 2)             # embedding + head parameters
    block = 4 * d * d + 3 * d * h + 2 * d
    parts = dict(params=4 * n / world, grads=4 * n / world, adam=8 * n / world,
                 gathered=2 * (head + 2 * block),           # bf16: embedding, head kept gathered, 2 blocks in flight
                 reduce_buffers=6 * (head / 2 + 2 * block), # bf16 unsharded grads + fp32 reduce-scatter input
                 logits_t1=12 * tok * V,                    # worst t: bf16 logits, fp32 upcast, fp32 + bf16 grads
                 overhead=ALLOWANCE_GIB * GIB)              # CUDA context, NCCL buffers, fragmentation (allowance)
    none = 2 * (14 * d + 4 * h) * tok
    acts = {"none": nl * none, "selective": nl * 2 * (7 * d + 2 * h) * tok,
            "every-2": (nl // 2) * none + (nl - nl // 2) * 2 * d * tok + none, "full": nl * 2 * d * tok + none}
    fixed = sum(parts.values())
    # the held-out NLL: no gradients, micro-batch chunks of t up to 1 (bf16 logits and their fp32 CE)
    evaluation = fixed - parts["grads"] - parts["reduce_buffers"] - parts["logits_t1"] + 6 * tok * V + none
    return {k: v / GIB for k, v in parts.items()}, {k: (fixed + a) / GIB for k, a in acts.items()}, evaluation / GIB


# ----------------------------------------------------------------------------- the trace

def trace(mc, micro_batch, block_size, world, policy, accumulation=2):
    """The peak memory of one optimizer step per GPU, traced on fake tensors: {category: GiB,
    "total": GiB}. Needs no GPU and almost no memory (~25 s at 8B on a laptop CPU). Must run where
    no process group exists (a --dry-run; a run starts it in a child process: trace_in_child)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("plan.trace needs a process without a process group (use trace_in_child)")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        m = meta_model(replace(mc, block_size=block_size))
        fsdp.parallelize(m, policy, compile_blocks=False, mixed_precision=True)
        with FakeTensorMode(allow_non_fake_inputs=True):
            m.to_empty(device="cpu")
            opt = m.configure_optimizer(1e-4, 0.01, (0.9, 0.95), "cpu", fused=False)
            x0 = torch.randint(0, mc.mask_id, (micro_batch, block_size))
            worst_case_step(m, x0, accumulation)            # untraced: AdamW's state now exists
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker = FSDPMemTracker(m, opt)
            tracker.track_inputs((x0,))
            with tracker:
                worst_case_step(m, x0, accumulation, before_each=tracker.reset_mod_stats)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=False)
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    finally:
        dist.destroy_process_group()
    out = {str(getattr(k, "value", k)).lower().replace(" ", "_"): v / GIB for k, v in peak.items()}
    return out


def worst_case_step(m, x0, accumulation, before_each=None):
    """Forward and backward of `accumulation` micro-batches at t = 1 (every token masked, every
    position through the head): the step's largest memory."""
    for _ in range(accumulation):
        if before_each:
            before_each()         # the tracker follows one forward per module and iteration
        logits = m(torch.full_like(x0, m.cfg.mask_id))
        loss = masking.token_ce(logits.flatten(0, 1), x0.flatten()).mean() / accumulation
        loss.backward()
        del logits, loss


def trace_in_child(mc, micro_batch, block_size, world, policy):
    """plan.trace in a child process (a run already holds a process group): its JSON result."""
    args = json.dumps(dict(mc=vars(mc), micro_batch=micro_batch, block_size=block_size, world=world, policy=policy))
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "machinery.plan", args], capture_output=True, text=True, env=env,
                       cwd=root)
    if r.returncode:
        raise RuntimeError(f"the memory trace failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def traced_peaks(mc, cfg, world, policies, stop_when_fits=False):
    """{policy: trace} for each policy (in a child process when a group exists); stop_when_fits:
    the first policy that fits ends the list (--ac auto tries them cheapest first)."""
    out = {}
    for policy in policies:
        run = trace_in_child if dist.is_initialized() else trace
        out[policy] = run(mc, cfg.micro_batch, cfg.block_size, world, policy)
        if stop_when_fits and fits(out[policy]["total"], cfg.gpu_gib):
            break
    return out


def fits(traced_total, gpu_gib):
    return traced_total + ALLOWANCE_GIB < 0.9 * gpu_gib


def auto_policy(peaks, gpu_gib):
    """The first policy of {policy: trace} (cheapest first) that fits; full when none does."""
    return next((p for p, t in peaks.items() if fits(t["total"], gpu_gib)), "full")


def choose_ac(cfg, world, device, model_cfg=None):
    """--ac auto: on a GPU, the cheapest policy in recomputation (none, then selective, then full)
    whose traced peak plus the allowance fits 90% of --gpu-gib, for the model the run builds
    (`model_cfg`; SFT's is --init's); on a CPU, none. `world`: a number of GPUs, or a run's
    distributed.World, whose rank 0 traces and every rank gets its choice."""
    if cfg.ac != "auto":
        return cfg.ac
    if not device.startswith("cuda"):
        return "none"
    mc = plan_model_config(cfg, model_cfg)

    def decide():
        peaks = traced_peaks(mc, cfg, getattr(world, "size", world), POLICIES, stop_when_fits=True)
        return auto_policy(peaks, cfg.gpu_gib)
    return distributed.rank0(decide, world) if isinstance(world, distributed.World) else decide()


# ----------------------------------------------------------------------------- --dry-run

def add_flags(p, benchmark=False):
    """--dry-run's flags (and --benchmark's, for pretrain_8b.py)."""
    g = p.add_argument_group("the plan (--dry-run) and the benchmark")
    g.add_argument("--world-size", type=int, default=None, help="--dry-run: GPUs to plan for (default: the "
                                                                "launcher's, else 8)")
    g.add_argument("--plan-mfu", type=float, default=0.40, help="--dry-run: MFU to time the run at (%(default)s)")
    g.add_argument("--no-trace", dest="trace", action="store_false",
                   help="--dry-run: the arithmetic alone, without tracing a step on fake tensors")
    if benchmark:
        g.add_argument("--benchmark", action="store_true", help="time full-width training steps (see --bench-layers)")
        g.add_argument("--bench-layers", type=int, default=4, help="--benchmark: blocks (0: the preset's) (%(default)s)")
        g.add_argument("--bench-steps", type=int, default=10, help="--benchmark: timed steps (%(default)s)")
        g.add_argument("--bench-trace", action="store_true", help="--benchmark: also trace the same step on fake "
                                                                  "tensors, for the traced peak beside the measured one")


def dry_run(cfg, a, paper_hours=None, model_cfg=None):
    """--dry-run: the flags checked, the run's settings checked for the world planned, the plan printed."""
    check_flags(a)
    world = a.world_size or int(os.environ.get("WORLD_SIZE", "8"))
    fsdp.check_run_settings(cfg, world)
    if model_cfg is not None and cfg.block_size > model_cfg.block_size:
        raise UserError(f"--block-size {cfg.block_size} exceeds --init's max_sequence_length {model_cfg.block_size}")
    return plan(cfg, world, a.plan_mfu, paper_hours=paper_hours, model_cfg=model_cfg, traced=a.trace)


def run_benchmark(cfg, a, device, compile_model):
    """--benchmark: the flags checked, the steps timed, OUT_DIR/benchmark.json written by rank 0."""
    check_flags(a)
    out = benchmark(cfg, device, compile_model, a.bench_layers, a.bench_steps, timeout_s=a.dist_timeout,
                    traced=a.bench_trace)
    if int(os.environ.get("RANK", "0")) == 0:
        write_benchmark(out, a.out_dir or os.path.join("out", "pretrain", f"benchmark_{a.preset}"))
    return out


def check_flags(a):
    """The --dry-run and --benchmark flags, before anything is planned or built."""
    check_positive(plan_mfu=a.plan_mfu, **({"world_size": a.world_size} if a.world_size is not None else {}))
    if a.plan_mfu > 1:
        raise UserError(f"--plan-mfu is a fraction of the peak (0.4 = 40%), got {a.plan_mfu}")
    if hasattr(a, "bench_steps"):
        check_positive(bench_steps=a.bench_steps)
    if getattr(a, "bench_layers", 0) < 0:
        raise UserError(f"--bench-layers must be >= 0 (0: the preset's), got {a.bench_layers}")


def plan(cfg, world, mfu, peak=989e12, paper_hours=None, model_cfg=None, traced=True):
    """--dry-run: parameters, FLOPs, memory per GPU under each checkpointing policy on `world` GPUs
    of cfg.gpu_gib (arithmetic, and traced unless traced=False), and time at `mfu` of `peak` (H100
    SXM: 989 TFLOP/s dense bf16). Returns the numbers it prints."""
    mc = plan_model_config(cfg, model_cfg)
    m = meta_model(mc)
    n, V, d = m.num_params(), mc.vocab_size, mc.d_model
    head_frac = (cfg.t0 + cfg.t1) / 2                      # E[t]: share of positions that run the head
    fpt = m.flops_per_token(cfg.block_size, head_frac)
    tokens_step = cfg.batch_size * cfg.block_size
    parts, totals, evaluation = memory_gib(cfg, world, m)
    step_s = fpt * tokens_step / (world * peak * mfu)
    accum = cfg.batch_size / (cfg.micro_batch * world)
    print(f"{cfg.model if model_cfg is None else 'the --init model'}: {n:,} parameters "
          f"({n - V * d * (1 if mc.tie_weights else 2):,} outside the embedding and head), block {cfg.block_size}, "
          f"vocabulary {V:,}")
    print(f"FLOPs per token (6N + attention, head on the masked share E[t] = {head_frac:g}): {fpt / 1e9:.2f} G; "
          f"per step of {cfg.batch_size} x {cfg.block_size} = {tokens_step:,} tokens: {fpt * tokens_step:.3e}")
    print(f"per GPU, {world} GPUs, micro-batch {cfg.micro_batch} ({accum:g} accumulation steps), FSDP2 "
          f"(fp32 master, bf16 compute), GiB (arithmetic):")
    for k, v in parts.items():
        print(f"  {k:<28} {v:8.2f}")
    for policy, total in totals.items():
        print(f"  total, --ac {policy:<10} {total:8.1f} of {cfg.gpu_gib:g} GiB "
              f"({'fits' if total < 0.9 * cfg.gpu_gib else 'does NOT fit'} in 90%)")
    print(f"  held-out evaluation (no gradients, chunks of {cfg.micro_batch} sequences) {evaluation:8.1f}")
    out = dict(parameters=n, flops_per_token=fpt, flops_per_step=fpt * tokens_step, step_seconds=step_s,
               total_hours=step_s * cfg.max_steps / 3600, gib=parts, total_gib=totals, evaluation_gib=evaluation)
    if traced:
        out["traced_gib"] = print_traces(cfg, world, mc, totals)
        out["ac_auto"] = auto_policy(out["traced_gib"], cfg.gpu_gib)
        print(f"--ac auto picks {out['ac_auto']}: the cheapest policy whose traced peak + {ALLOWANCE_GIB:g} GiB "
              f"allowance fits 90% of {cfg.gpu_gib:g} GiB (selective repeats the elementwise ops, full a whole "
              f"forward of each block, ~25% of the step)")
    print(f"time at {100 * mfu:.0f}% MFU of {peak / 1e12:.0f} TFLOP/s per GPU: {step_s:.2f} s a step, "
          f"{out['total_hours']:.1f} h for {cfg.max_steps:,} steps ({cfg.max_steps * tokens_step / 1e9:.2f} B tokens)")
    if paper_hours:
        implied = fpt * tokens_step * cfg.max_steps / (paper_hours * 3600 * world * peak)
        out["paper_hours_mfu"] = implied
        print(f"the paper's 'about {paper_hours} hours' for {cfg.max_steps:,} steps on {world} H100s implies "
              f"{100 * implied:.0f}% MFU")
    return out


def print_traces(cfg, world, mc, totals):
    """Each policy traced (--ac X: that one; auto: none, selective and full), by category, beside the
    arithmetic's total (which includes the allowance)."""
    policies = POLICIES if cfg.ac == "auto" else (cfg.ac,)
    print(f"traced on fake tensors: one step of {world} ranks, 2 micro-batches of {cfg.micro_batch} x "
          f"{cfg.block_size} at t = 1, clip; peak per GPU, GiB:", flush=True)
    peaks = traced_peaks(mc, cfg, world, policies)
    for policy, t in peaks.items():
        shown = ", ".join(f"{k} {v:.3g}" for k, v in t.items() if k != "total" and v > 0)
        arithmetic = f"; arithmetic {totals[policy] - ALLOWANCE_GIB:.1f}" if policy in totals else ""
        print(f"  --ac {policy:<10} traced peak {t['total']:6.3g} (+ {ALLOWANCE_GIB:g} allowance = "
              f"{t['total'] + ALLOWANCE_GIB:.1f}{arithmetic}): {shown}", flush=True)
    return peaks


# ----------------------------------------------------------------------------- --benchmark

def benchmark(cfg, device, compile_model, layers, steps=10, warmup=2, timeout_s=600.0, traced=False):
    """Optimizer steps as the full run takes them (its gradient accumulation: batch_size /
    (micro_batch x GPUs) micro-batches a step) on the preset's full-width blocks (`layers` of them,
    with the embedding and head), FSDP2 over the GPUs present, random tokens, t ~ U[t0, t1]; tokens/s
    per GPU, MFU and peak memory (rank 0 prints). With fewer blocks than the model the head's share
    of the FLOPs is larger than in the full run: it is printed beside the result. traced: rank 0 also
    traces the same model's step on fake tensors (trace_in_child) for its peak beside the measured one."""
    ranks = distributed.setup(device, timeout_s)
    try:
        return timed_steps(cfg, ranks, compile_model, layers, steps, warmup, traced)
    finally:
        distributed.teardown()


def timed_steps(cfg, ranks, compile_model, layers, steps, warmup, traced):
    """benchmark()'s measurement, once the processes have met."""
    rank, world, device = ranks.rank, ranks.size, ranks.device
    fsdp.check_run_settings(cfg, world)
    full = meta_model(plan_model_config(cfg))
    mc = replace(full.cfg, n_layer=min(layers or full.cfg.n_layer, full.cfg.n_layer))     # never more than the model
    ac = choose_ac(cfg, ranks, device, mc)
    model, opt = fsdp.build(mc, cfg, device, compile_model, ac)
    ce_fn = masking.compiled_token_ce() if compile_model else masking.token_ce
    gen = torch.Generator(device).manual_seed(rank)
    accum = cfg.batch_size // (cfg.micro_batch * world)

    def one_step():
        frac = torch.zeros((), device=device)
        for _ in range(accum):
            x0 = torch.randint(0, mc.mask_id, (cfg.micro_batch, cfg.block_size), generator=gen, device=device)
            loss, masked = masking.md_step_loss(model, x0, mc.mask_id, cfg.t0, cfg.t1, generator=gen, ce_fn=ce_fn)
            (loss / accum).backward()
            frac += masked.float().mean() / accum
        clip_gradients(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return frac
    seconds, fracs = time_steps(one_step, steps, warmup, device)
    frac, cuda = fracs.mean().item(), device.startswith("cuda")
    tok_s = steps * accum * cfg.micro_batch * cfg.block_size / seconds      # per GPU
    fpt = model.flops_per_token(cfg.block_size, frac)
    head = lambda m: 6 * m.cfg.vocab_size * m.cfg.d_model * frac / m.flops_per_token(cfg.block_size, frac)
    mfu = model_lib.estimate_mfu(fpt, tok_s, model_lib.device_peak_flops(device))
    out = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=world, model=cfg.model,
               n_layer=mc.n_layer, d_model=mc.d_model, block_size=cfg.block_size, micro_batch=cfg.micro_batch,
               accumulation=accum, ac=ac, compile=compile_model, tokens_per_sec_per_gpu=tok_s, mfu=mfu,
               head_share=head(model), head_share_full_model=head(full),
               peak_memory_gib=torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
               traced_peak_gib=trace_in_child(mc, cfg.micro_batch, cfg.block_size, world, ac)["total"]
               if traced and rank == 0 else None)
    if rank == 0:
        print(f"{mc.n_layer} of {full.cfg.n_layer} blocks (d_model {mc.d_model}) + head, {accum} x {cfg.micro_batch} "
              f"x {cfg.block_size} tokens per GPU per step, {world} GPU(s), --ac {ac}, compile "
              f"{'on' if compile_model else 'off'}: {tok_s:,.0f} tokens/s per GPU" +
              (f", MFU {100 * mfu:.1f}%" if mfu else "") +
              (f", peak memory {out['peak_memory_gib']:.1f} GiB" if cuda else "") +
              (f" (traced {out['traced_peak_gib']:.1f})" if out["traced_peak_gib"] is not None else "") +
              f"; the head is {100 * out['head_share']:.0f}% of these FLOPs, {100 * out['head_share_full_model']:.0f}% "
              f"of the full model's", flush=True)
    return out


def write_benchmark(out, out_dir):
    """OUT_DIR/benchmark.json, the folder made (or refused in one line) first."""
    from machinery.files import write_json
    from machinery.run import prepare_out_dir
    prepare_out_dir(out_dir)
    write_json(os.path.join(out_dir, "benchmark.json"), out)


def time_steps(step, steps, warmup, device):
    """Benchmark timing: run `step` warmup times untimed, then `steps` times; on CUDA synchronise
    and reset the peak-memory counter first. Returns (seconds of the timed steps, their outputs
    stacked)."""
    import time
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    out = torch.stack([step() for _ in range(steps)])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.time() - start, out


if __name__ == "__main__":          # trace_in_child's child: one trace, printed as JSON
    kw = json.loads(sys.argv[1])
    print(json.dumps(trace(model_lib.ModelConfig(**kw.pop("mc")), **kw)))
