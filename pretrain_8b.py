"""
LLaDA-8B pre-trained from scratch on DCLM with FSDP2: U[0, 1] against the signal-rich U[0.45, 0.55]
(paper §5.2.1, Fig. 4; Table 4's hyper-parameters are the defaults).

    torchrun --nproc_per_node=8 pretrain_8b.py                        # the U[0, 1] baseline
    torchrun --nproc_per_node=8 pretrain_8b.py --t0 0.45 --t1 0.55    # the signal-rich run
    python pretrain_8b.py --dry-run                                   # the plan: parameters, FLOPs, memory, time
    torchrun --nproc_per_node=8 pretrain_8b.py --benchmark            # tokens/s and MFU of full-width blocks
    python pretrain_8b.py --plot-runs out/pt_u01 out/pt_045          # Fig. 4 from finished runs
    torchrun --nproc_per_node=2 pretrain_8b.py --preset tiny --device cpu --data some.txt --max-steps 4

Each step draws t ~ U[t0, t1] per sequence, masks, and minimises masking.md_loss with the
head run at masked positions only. Every --eval-every steps the held-out NLL is
masking's full-range bound (t over all of [0, 1], whatever the training window) on
documents training never reads, with the same masks for every run.

Reading order: Table 4's settings, then train(): DCLM dealt to data slots and the held-out set,
the FSDP2 model, the loop with its step, the held-out NLL, checkpoints, the export and the
summary; then the command line. The machinery it calls (torchrun, FSDP2, the data slots, sharded
checkpoints, the plan) is in machinery/.
"""
import os
from dataclasses import dataclass

import torch

import masking
import model as model_lib
from machinery import cli, dclm, fsdp, llada, plan
from machinery.optim import clip_gradients, lr_at
from machinery.run import Run

DCLM = "mlfoundations/dclm-baseline-1.0"


@dataclass
class PretrainConfig:
    model: str = "llada-8b"           # a model.py preset
    dataset: str = DCLM               # Hub dataset, streamed; --data reads local files instead
    data: str = ""                    # local file or folder: .txt/.raw (a document per line), .jsonl/.json (also .zstd/.gz, DCLM's layout) or .parquet
    text_field: str = "text"          # the column of --data / --dataset holding the document text
    tokenizer: str = llada.LLADA            # Hub id, tokenizer.json or a folder holding one; "" = bytes
    block_size: int = 4096            # tokens per sequence (§5.2.1: 4096)
    batch_size: int = 128             # sequences per optimizer step, all GPUs together (§5.2.1)
    micro_batch: int = 2              # sequences per GPU per forward; the rest is accumulated
    max_steps: int = 15000
    lr: float = 1e-4                  # AdamW peak learning rate (Table 4)
    min_lr: float = 1e-5              # the schedule's floor
    warmup: int = 2000                # linear warm-up steps (Table 4)
    schedule: str = "wsd"             # wsd (LLaDA: warm-up, constant, decay) | cosine | constant
    decay_frac: float = 0.2           # wsd: share of the steps, at the end, of linear decay to min_lr
    weight_decay: float = 0.01        # AdamW weight decay (Table 4)
    beta2: float = 0.95               # AdamW beta2
    grad_clip: float = 1.0            # clip the global gradient norm to this (0: never)
    random_length_prob: float = 0.01  # LLaDA: 1% of steps train on a random length in [1, block]
    t0: float = 0.0
    t1: float = 1.0
    eval_every: int = 500             # steps between held-out NLL evaluations
    eval_docs: int = 2000             # the first documents of the stream, held out from training
    eval_seqs: int = 128              # held-out sequences scored
    eval_draws: int = 8               # stratified t draws per sequence
    eval_batch: int = 1               # sequences per evaluation forward (x eval_draws)
    log_every: int = 10               # steps between log lines (and host syncs)
    save_every: int = 500             # steps between sharded checkpoints
    keep: int = 2                     # complete checkpoints kept
    ac: str = "auto"                  # activation checkpointing: auto (the plan picks for --gpu-gib) | none | full | selective | every-N
    gpu_gib: float = 80.0             # memory of one GPU, for the plan and --ac auto (H100: 80, H200: 141)
    last_save_model_only: bool = False  # the run's last checkpoint without the optimizer (exports, does not resume)
    export_dtype: str = "bfloat16"    # LLaDA's Hub weights are bfloat16
    seed: int = 0

PRESETS = {
    # §5.2.1: 128 x 4096 tokens a step, 15,000 steps; Table 4: AdamW 1e-4, wd 0.01, 2,000 warm-up steps.
    "llada-8b": {},
    # LLaDA's architecture and tokenizer at 0.47 B parameters, blocks of 2048, 1.6 B tokens: each of
    # Fig. 4's two runs is planned (not measured) at 2.3 h of one H100 at 40% MFU (--dry-run)
    "llada-proxy": dict(model="llada-proxy", block_size=2048, batch_size=64, micro_batch=8, max_steps=12000,
                        lr=3e-4, min_lr=3e-5, warmup=1000, eval_every=250, eval_seqs=256, eval_batch=2,
                        save_every=1000),
    # seconds on a laptop CPU, byte-level tokenizer, nothing downloaded: tests and a first look
    "tiny": dict(model="tiny", tokenizer="", block_size=64, batch_size=8, micro_batch=2, max_steps=20, lr=3e-3,
                 min_lr=3e-4, warmup=2, eval_every=10, eval_docs=16, eval_seqs=8, eval_draws=4, eval_batch=2,
                 log_every=1, save_every=5, export_dtype="float32"),
}


SCRIPT = "pretrain_8b.py"
LENGTH_SEED_OFFSET = 500_000    # step s's length is drawn from seed * stride + offset + s: no slot's mask generator


# ----------------------------------------------------------------------------- the experiment

def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, export_dir=None, plot=False,
          allow_change=(), timeout_s=600.0):
    """One pre-training run under torchrun (or as a world of one). Writes OUT_DIR/{run.json, step_*/,
    log.jsonl, summary.json, export/}; returns the summary (the finished one, marked done, when OUT_DIR
    holds this very run)."""
    fsdp.check_run_settings(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    with Run(SCRIPT, cfg, out_dir, resume=resume, allow_change=allow_change, bookkeeping=fsdp.BOOKKEEPING,
             inputs=lambda: {"data": dclm.fingerprint(cfg)}, checkpoints=fsdp.ShardedCheckpoints(cfg.keep),
             torchrun=True, device=device, timeout_s=timeout_s, log_file=True, report=("test_loss", "steps")) as run:
        if run.done:
            return run.finished()[0]
        export_dir = fsdp.export_path(export_dir, out_dir, cfg.max_steps)
        device = run.device

        with run.together():
            tok = llada.load_tokenizer(cfg.tokenizer)
            tok_ids = llada.token_ids(tok, model_lib.get_config(cfg.model))
            model_cfg = llada.model_config(cfg.model, tok_ids, block_size=cfg.block_size)
        # data: DCLM's files in an order shuffled by --seed, the first eval_docs documents held out,
        # the rest dealt to data slots (one per micro-batch of the global batch)
        eval_seqs, data = dclm.open_data(cfg, tok, tok_ids["eos"], run)

        # model: LLaDA-8B on `meta`, FSDP2 units over the ranks, activation checkpointing by the plan
        model, opt = fsdp.build(model_cfg, cfg, device, compile_model,
                                plan.choose_ac(cfg, run.world, device, model_cfg))
        saved = run.restore(model=model, opt=opt, data=data)
        n_slots = cfg.batch_size // cfg.micro_batch
        run.log(f"{describe(cfg)}: {model.num_params():,} parameters ({cfg.model}), batch {cfg.batch_size} x "
                f"{cfg.block_size} ({n_slots // run.world.size} x {cfg.micro_batch} x {run.world.size} GPUs), {cfg.max_steps} "
                f"steps on {device}; data {data.where} ({data.files:,} files, in an order shuffled by --seed); "
                f"{len(eval_seqs)} held-out sequences")

        ce = masking.compiled_token_ce() if compile_model else masking.token_ce
        meter = fsdp.Meter(run, cfg, model, tokens=saved["tokens"] if saved else 0)
        # after restore: the slots continue from the checkpoint's positions, one step drawn ahead on a thread
        data.start(run.step, cfg.max_steps, length=lambda step: sequence_length(step, cfg))
        for step in range(run.step, cfg.max_steps):
            # ----------------------------------------------------------------------------- the step
            lr = lr_at(step, cfg.lr, warmup=cfg.warmup, max_steps=cfg.max_steps, schedule=cfg.schedule,
                       min_lr=cfg.min_lr, decay_frac=cfg.decay_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            micro = data.next()                # this rank's micro-batches, one per data slot, with its masks' generator
            length = micro[0][0].shape[1]
            with fsdp.eager_unless(length == cfg.block_size):        # random-length steps: no new graph
                for x0, gen in micro:          # t ~ U[t0, t1], masks, forward at masked positions, 1/t-weighted CE
                    loss, masked = masking.md_step_loss(model, x0.to(device, non_blocking=True), model.cfg.mask_id,
                                                        cfg.t0, cfg.t1, generator=gen, ce_fn=ce)
                    (loss / len(micro)).backward()
                    meter.add(loss, masked, len(micro))
            norm = clip_gradients(model.parameters(), cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            meter.end_step(opt, norm, length)  # a non-finite norm: the fused AdamW skips the step on the device
            opt.step()
            opt.zero_grad(set_to_none=True)
            # -----------------------------------------------------------------------------
            steps_done = step + 1
            if not meter.due(steps_done):      # a log, eval or save step, or the last: else no host sync
                continue
            loss, frac = meter.check(steps_done)   # every rank meets: a non-finite step stops the run here
            if steps_done % cfg.log_every == 0 or steps_done == cfg.max_steps:
                line, record = meter.record(steps_done, lr, norm, loss, frac)
                run.log(line, **record)       # printed by rank 0, kept in the history and log.jsonl
            if steps_done % cfg.eval_every == 0 or steps_done == cfg.max_steps:
                nll = fsdp.heldout_nll(model, eval_seqs, cfg, device)
                run.log(f"step {steps_done:6d} | held-out NLL {nll:.4f} (full-range bound, nats/token)",
                        step=steps_done, test_loss=nll)
            if steps_done % cfg.save_every == 0 or steps_done == cfg.max_steps:
                run.save(steps_done, model=model, opt=opt, data=data, tokens=meter.tokens,
                         model_only=steps_done == cfg.max_steps and cfg.last_save_model_only)

        skipped = data.skipped()
        if skipped:
            run.log(f"skipped rows of {data.where}: {dclm.describe_skipped(skipped)}", skipped=skipped)
        run.complete_checkpoints()             # the last checkpoint whole on disk before the export
        fsdp.export(model, export_dir, tok, tok_ids, cfg.export_dtype)
        summary = run.finish(dict(fsdp.run_summary(run, model, meter), export=export_dir, skipped_rows=skipped))
    if plot and run.master:
        plot_runs([out_dir], os.path.join(out_dir, "heldout_nll.png"))
    return summary


def sequence_length(step, cfg):
    """LLaDA: with probability random_length_prob a step trains on a length uniform on [1, block],
    drawn from a generator seeded by the step, so every rank crops to the same length."""
    g = torch.Generator().manual_seed(cfg.seed * dclm.SLOT_SEED_STRIDE + LENGTH_SEED_OFFSET + step)
    if torch.rand((), generator=g).item() < cfg.random_length_prob:
        return int(torch.randint(1, cfg.block_size + 1, (), generator=g))
    return cfg.block_size


def describe(cfg):
    return f"MD U[{cfg.t0:g}, {cfg.t1:g}]"


def default_out_dir(cfg, preset):
    """out/pretrain/<preset>_U<t0>-<t1>_s<seed>: the README's two runs land in folders of their own."""
    return os.path.join("out", "pretrain", f"{preset}_U{cfg.t0:g}-{cfg.t1:g}_s{cfg.seed}")


def plot_runs(run_dirs, path):
    """Fig. 4: the held-out NLL of finished pre-training runs against the step."""
    fsdp.plot_runs(run_dirs, SCRIPT, path, "Fig. 4: pre-training test loss", "held-out NLL (full-range bound, nats/token)")


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    """(flags, settings): the preset's settings, then every flag given."""
    p = fsdp.parser(__doc__.split("\n\n")[0] + " See README 'Pre-training'.", PRESETS, "llada-8b", 0.0, 1.0)
    data = p.add_argument_group("data and model")
    data.add_argument("--model", help="a model.py preset")
    data.add_argument("--dataset", help="Hub dataset, streamed (--data reads local files instead)")
    data.add_argument("--data", help="local file or folder: .txt/.raw (a document per line), .jsonl/.json (also "
                                     ".zstd/.gz, DCLM's layout) or .parquet")
    data.add_argument("--text-field", help="the column of --data / --dataset holding the document text")
    data.add_argument("--tokenizer", help="Hub id, tokenizer.json or a folder holding one; '' = bytes")
    data.add_argument("--random-length-prob", type=float, help="LLaDA: the share of steps trained on a random length "
                                                               "in [1, block]")
    data.add_argument("--eval-docs", type=int, help="the first documents of the stream, held out from training")
    data.add_argument("--eval-seqs", type=int, help="held-out sequences scored")
    plan.add_flags(p, benchmark=True)
    return cli.parse(p, argv, PretrainConfig, PRESETS)


def main(argv=None):
    a, cfg = parse_args(argv)
    plan_only = (a.dry_run, "with --dry-run")
    bench_only = (a.benchmark, "with --benchmark")
    cli.check_used(a, world_size=plan_only, plan_mfu=plan_only, trace=plan_only, bench_layers=bench_only,
                   bench_steps=bench_only, bench_trace=bench_only, allow_change=(a.resume, "with --resume"))
    if a.plot_runs:
        path = os.path.join(a.out_dir or "out/fig4", "fig4_heldout_nll.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot_runs(a.plot_runs, path)
        print(f"wrote {path}")
        return
    if a.dry_run:
        plan.dry_run(cfg, a, paper_hours=20 if cfg.model == "llada-8b" else None)
        return
    device = cli.pick_device(a.device)
    compile_model = device.startswith("cuda") if a.compile is None else a.compile    # on by default on GPUs
    if a.benchmark:
        plan.run_benchmark(cfg, a, device, compile_model)
        return
    out_dir = a.out_dir or default_out_dir(cfg, a.preset)
    summary = train(cfg, out_dir, device=device, resume=a.resume, compile_model=compile_model, export_dir=a.export,
                    plot=a.plot, allow_change=a.allow_change, timeout_s=a.dist_timeout)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not summary.get("done"):
        print(f"{describe(cfg)}: held-out NLL {summary['test_loss']:.4f} nats/token after {summary['steps']} steps "
              f"({summary['tokens']:,} tokens, {summary['seconds']:.0f}s); wrote {out_dir}/summary.json, "
              f"{summary['export']}")


if __name__ == "__main__":
    cli.run_cli(main)
