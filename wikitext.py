"""
The 50M masked-diffusion language model on WikiText and the interval sweep (paper §5-5.1, App. F.3-F.4).

    python wikitext.py --t0 0.45 --t1 0.55               # one run, the paper's setting (WikiText-103, 6000 steps)
    python wikitext.py --sweep                           # Fig. 3/7: ten width-0.1 intervals + U[0, 1]
    python wikitext.py --preset cpu --sweep              # the same sweep, CPU-sized, on WikiText-2
    python wikitext.py --interval auto                   # the window around the corpus's t* (theory.py)
    python wikitext.py --benchmark --device cuda         # tokens/s and MFU of training steps
    torchrun --nproc_per_node=8 wikitext.py --micro-batch 128   # DDP: 1024 = 1 x 128 x 8

Training draws t ~ U[t0, t1] and minimises masking.md_loss; the test loss is the
full-range bound masking.elbo_nll (t over all of [0, 1], whatever the training
window), on the test split, with the same fixed draws for every run, so the runs
compare exactly (§5). Data: GPT-2 BPE (tiktoken) or raw bytes, cached once as uint16 memmaps.

Reading order: the settings, then train() (data, model, the loop with its step, the test loss,
summary), then its helpers, the sweep (Fig. 3, 7), the benchmark and the command line.
"""
import argparse
import csv
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import masking
import model as model_lib
import theory
from machinery import cli, corpus, sweep
from machinery.cli import UserError
from machinery.files import save_figure
from machinery.optim import clip_gradients, lr_at
from machinery.plan import time_steps, write_benchmark
from machinery.run import Run


@dataclass
class WikiConfig:
    model: str = "wikitext-50m"       # a model.py preset
    dataset: str = "wikitext-103"     # Hub WikiText (raw), unless --data gives local files
    data: str = ""                    # local folder with *train* / *valid* / *test* raw text files
    tokenizer: str = "gpt2"           # gpt2 (tiktoken's BPE) | bytes
    tokenizer_file: str = ""          # local gpt2.tiktoken (no download)
    train_split: str = "train"
    eval_split: str = "test"
    cache_dir: str = "data"           # token caches (keyed by the source's content and the tokenizer)
    block_size: int = 150             # tokens per sequence (§5.1)
    batch_size: int = 1024            # sequences per optimizer step (§5.1)
    micro_batch: int = 512            # sequences per forward/backward, the rest accumulated (1024 fits an H200)
    max_steps: int = 6000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup: int = 300
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    t0: float = 0.0
    t1: float = 1.0
    t_dist: str = "uniform"           # uniform on [t0, t1] | beta | logit-normal (around t_mean, spread t_std)
    t_mean: float = 0.5
    t_std: float = 0.1
    eval_every: int = 250
    eval_seqs: int = 512
    eval_draws: int = 8
    log_every: int = 10
    ckpt_every: int = 250
    masked_head: bool = True          # the output head on masked positions only
    stratified_t: bool = True         # t of a micro-batch tiled by one offset (each still U[t0, t1])
    seed: int = 0


PRESETS = {
    # §5.1: 50M model, batch 1024 x 150, 6000 steps, WikiText-103. The schedule (warm-up 5%,
    # cosine to lr/10, peak 6e-4, AdamW (0.9, 0.95), wd 0.1) is nanoGPT's GPT-2 recipe; the
    # paper does not give one.
    "paper": {},
    # the whole 11-run sweep in about 45 minutes on 2 CPU cores (0.2 s a step at small t, 1.4 s
    # near t = 1, where the 50k-vocabulary head runs on almost every position): a 2-layer,
    # 128-wide model with the same vocabulary on WikiText-2, 300 steps of 16 x 150 tokens
    "cpu": dict(model="wikitext-cpu", dataset="wikitext-2", batch_size=16, micro_batch=16, max_steps=300,
                lr=3e-3, min_lr=3e-4, warmup=30, eval_every=100, eval_seqs=64, eval_draws=8, ckpt_every=100,
                log_every=25),
    # seconds: tests and a first look
    "tiny": dict(model="wikitext-cpu", dataset="wikitext-2", block_size=64, batch_size=8, micro_batch=8,
                 max_steps=20, lr=3e-3, warmup=2, eval_every=10, eval_seqs=8, eval_draws=4, ckpt_every=5,
                 log_every=5),
}

# WikiText-2's validation text as raw bytes on a laptop CPU (docs/wikitext.md, "WikiText as raw bytes"):
# 3 blocks of width 128 (0.66 M parameters) on windows of 64 bytes, 32 a step, 3,000 steps (5.4 passes
# over the 1.1 MB); nanoGPT's recipe otherwise (cosine from 2e-3, clipping at 1). 4 minutes on 2 CPU threads.
PRESETS["bytes"] = dict(model="bytes", tokenizer="bytes", dataset="wikitext-2", train_split="valid", block_size=64,
                        batch_size=32, micro_batch=32, max_steps=3000, lr=2e-3, min_lr=2e-4, warmup=100,
                        eval_every=250, eval_seqs=128, eval_draws=8, ckpt_every=500, log_every=100)

SCRIPT = "wikitext.py"
PLATEAU_MARGIN = 0.1        # a run has left the unigram plateau at its first test loss this far below H_1
EVAL_SEED = 1234            # the test loss's masks: one generator seeded so, every run and every evaluation alike
DATA_SEED_STRIDE = 1000     # rank r of a run seeded s draws batches from s * stride + 2r, masks from s * stride + 2r + 1
BOOKKEEPING = ("log_every", "ckpt_every", "cache_dir")


# ----------------------------------------------------------------------------- the experiment

def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, dry_run=False, quiet=False,
          allow_change=(), timeout_s=600.0):
    """One run (DDP under torchrun): writes OUT_DIR/{ckpt.pt, history.json, summary.json}; returns
    (summary, history) on every rank, those of the finished run when OUT_DIR holds this very run."""
    model_cfg = model_config(cfg)
    check_config(cfg, model_cfg)
    with Run(SCRIPT, cfg, out_dir, resume=resume, allow_change=allow_change, bookkeeping=BOOKKEEPING, inputs=inputs(cfg),
             torchrun=True, device=device, timeout_s=timeout_s, dry_run=dry_run, quiet=quiet,
             report=("test_loss", "steps")) as run:
        if run.done:
            return run.finished()
        rank, world, device = run.world.rank, run.world.size, run.device
        torch.manual_seed(cfg.seed + rank)
        with run.together():         # every rank builds; a failure on one stops all of them with one line
            # data: the training split as one token stream; the test set is fixed windows of the test split
            enc = corpus.tokenizer(cfg.tokenizer, cfg.tokenizer_file)
            train_tokens = load_split(cfg, cfg.train_split, enc)
            test_seqs = eval_sequences(load_split(cfg, cfg.eval_split, enc), cfg)
            if len(train_tokens) <= cfg.block_size:
                raise UserError(f"the {cfg.train_split} split has only {len(train_tokens)} tokens")
            if len(test_seqs) == 0:
                raise UserError(f"the {cfg.eval_split} split has fewer than {cfg.block_size} tokens")
            unigram = unigram_entropy(train_tokens)     # what a model that ignores context scores (its plateau)
            accum = cfg.batch_size // (cfg.micro_batch * world)
            if cfg.batch_size % (cfg.micro_batch * world):
                raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch {cfg.micro_batch} x "
                                f"{world} processes; change --batch-size or --micro-batch")

            # model: nanoGPT-style, bidirectional; its output head on the masked positions only
            with cli.user_input():
                masking.check_mask_id(model_cfg.mask_id, enc.n_vocab, model_cfg.vocab_size)
            model = model_lib.Transformer(model_cfg).to(device)
            if compile_model:                  # per block: the masked-only head stays eager (data-dependent shape)
                for block in model.transformer.blocks:
                    block.compile()
            opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), device.split(":")[0])
            data_gen = torch.Generator().manual_seed(cfg.seed * DATA_SEED_STRIDE + 2 * rank)
            mask_gen = torch.Generator(device).manual_seed(cfg.seed * DATA_SEED_STRIDE + 2 * rank + 1)
            run.restore(model=model, opt=opt, data_gen=data_gen, mask_gen=mask_gen)
        ddp = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            ddp = DistributedDataParallel(model, device_ids=[int(device.split(":")[1])] if ":" in device else None)
        ce = masking.compiled_token_ce() if compile_model else masking.token_ce
        max_steps = min(cfg.max_steps, run.step + 2) if dry_run else cfg.max_steps
        run.log(f"{describe(cfg)}: {model.num_params():,} parameters ({cfg.model}), {len(train_tokens):,} train tokens "
                f"({cfg.tokenizer}), {len(test_seqs)} test sequences, batch {cfg.batch_size} x {cfg.block_size} "
                f"({accum} x {cfg.micro_batch} x {world} proc), {max_steps} steps on {device}")

        window, t_log = [], time.time()
        for step in range(run.step, max_steps):
            # ----------------------------------------------------------------------------- the step
            lr = lr_at(step, cfg.lr, warmup=cfg.warmup, max_steps=cfg.max_steps, schedule="cosine", min_lr=cfg.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = torch.zeros((), device=device)       # summed on the device: one host sync a step
            masked_share = torch.zeros((), device=device)
            for micro in range(accum):
                x0 = get_batch(train_tokens, cfg.micro_batch, cfg.block_size, data_gen).to(device)
                if world > 1:                           # DDP reduces the gradients once, after the last
                    ddp.require_backward_grad_sync = micro == accum - 1
                with autocast(device):                  # t (U[t0, t1] or --t-dist), masks, forward, 1/t-weighted CE
                    micro_loss, masked = masking.md_step_loss(ddp, x0, model.cfg.mask_id, cfg.t0, cfg.t1,
                                                              generator=mask_gen, stratified=cfg.stratified_t,
                                                              masked_head=cfg.masked_head, ce_fn=ce, dist=cfg.t_dist,
                                                              mean=cfg.t_mean, std=cfg.t_std)
                (micro_loss / accum).backward()
                loss += micro_loss.detach() / accum
                masked_share += masked.float().mean() / accum
            if world > 1:                               # the mean over processes, not rank 0's share
                torch.distributed.all_reduce(loss)
                loss /= world
            loss = loss.item()
            if not math.isfinite(loss):
                raise UserError(f"the training loss became {loss} at step {step + 1}; stopped. "
                                f"{run.checkpoint_note().capitalize()}; lower --lr, or check the data")
            clip_gradients(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            # -----------------------------------------------------------------------------
            steps_done = step + 1
            window.append(loss)
            if steps_done % cfg.log_every == 0 or steps_done == max_steps:
                tok_s = len(window) * cfg.batch_size * cfg.block_size / (time.time() - t_log)
                flops = model.flops_per_token(cfg.block_size, masked_share.item() if cfg.masked_head else 1)
                mfu = model_lib.estimate_mfu(flops, tok_s, model_lib.device_peak_flops(device))
                run.log(f"step {steps_done:5d} | loss {sum(window) / len(window):.4f} (in-window) | lr {lr:.2e} | "
                        f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") +
                        f" | {run.eta(steps_done, max_steps)}",
                        step=steps_done, train_loss=sum(window) / len(window), tokens_per_sec=tok_s, seconds=run.seconds())
                window, t_log = [], time.time()
            if steps_done % cfg.eval_every == 0 or steps_done == max_steps:
                test_loss, bins = evaluate(model, test_seqs, cfg, device)
                run.log(f"step {steps_done:5d} | test loss {test_loss:.4f} (full-range bound, nats/token)",
                        step=steps_done, test_loss=test_loss, test_loss_bins=bins)
            if steps_done % cfg.ckpt_every == 0 or steps_done == max_steps:
                run.save(steps_done, model=model, opt=opt, data_gen=data_gen, mask_gen=mask_gen)
        return run.finish(summarize(cfg, run.history, model, run.seconds(), unigram)), run.history


def model_config(cfg):
    """The model preset, its vocabulary the tokenizer's plus MASK when the data is bytes."""
    with cli.user_input():
        mc = model_lib.get_config(cfg.model)
        if cfg.tokenizer == "bytes":                    # the 256 byte values, MASK = 256
            mc = replace(mc, vocab_size=257, mask_id=256)
        return mc


def check_config(cfg, model_cfg):
    cli.check_settings(cfg, positive=("batch_size", "micro_batch", "block_size", "max_steps", "eval_every",
                                      "ckpt_every", "log_every", "eval_seqs", "eval_draws"))
    cli.check_interval(cfg.t0, cfg.t1)
    with cli.user_input():
        masking.check_t_dist(cfg.t_dist, cfg.t_mean, cfg.t_std)
    if cfg.block_size > model_cfg.block_size:
        raise UserError(f"--block-size {cfg.block_size} exceeds the model's {model_cfg.block_size}")
    if cfg.batch_size % cfg.micro_batch:
        raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch {cfg.micro_batch}")
    if cfg.data and not os.path.isdir(cfg.data):
        raise UserError(f"--data {cfg.data} is not a folder")
    if cfg.tokenizer not in ("gpt2", "bytes"):
        raise UserError(f"--tokenizer must be gpt2 or bytes, got {cfg.tokenizer!r}")
    if cfg.tokenizer_file and not os.path.exists(cfg.tokenizer_file):
        raise UserError(f"--tokenizer-file {cfg.tokenizer_file} does not exist")
    check_splits(cfg)


def check_splits(cfg):
    """The test loss is never measured on the split trained on: other split names, and (local files,
    matched by name) other files."""
    if cfg.train_split == cfg.eval_split or {cfg.train_split, cfg.eval_split} <= {"valid", "validation"}:
        raise UserError(f"--eval-split {cfg.eval_split} is the split trained on (--train-split "
                        f"{cfg.train_split}): the test loss would be measured on training text")
    train, test = split_source(cfg, cfg.train_split), split_source(cfg, cfg.eval_split)
    if train == test:
        raise UserError(f"--train-split {cfg.train_split} and --eval-split {cfg.eval_split} both pick {train}: name "
                        f"the splits so they match other files")


# ----------------------------------------------------------------------------- data

def split_source(cfg, split):
    """Where a split is read from: a local file of --data, or the Hub dataset's split."""
    return corpus.source(cfg.data, cfg.dataset, split)


def load_split(cfg, split, enc):
    """Token ids of a split as a uint16 memmap, tokenised once and cached (nanoGPT's train.bin)."""
    return corpus.load_tokens(split_source(cfg, split), enc, cfg.cache_dir, cfg.tokenizer_file or None,
                              what=f"{split} split of {cfg.data or cfg.dataset}")


def get_batch(tokens, n, block_size, generator):
    """n random windows of block_size tokens (nanoGPT's get_batch); the generator is the data position."""
    starts = torch.randint(0, len(tokens) - block_size, (n,), generator=generator)
    return torch.from_numpy(np.stack([tokens[s:s + block_size] for s in starts.tolist()]).astype(np.int64))


def eval_sequences(tokens, cfg):
    """The fixed test set: the first eval_seqs non-overlapping windows of the split."""
    n = min(cfg.eval_seqs, len(tokens) // cfg.block_size)
    return torch.from_numpy(np.array(tokens[: n * cfg.block_size], dtype=np.int64).reshape(n, cfg.block_size))


# ----------------------------------------------------------------------------- the test loss

@torch.no_grad()
def evaluate(model, seqs, cfg, device, chunk=16):
    """The §5 test loss: the full-range bound (nats/token) and its ten t-bins, on fixed
    draws (one seeded generator per call, so every run and every step sees the same masks)."""
    model.eval()
    g = torch.Generator(device).manual_seed(EVAL_SEED)
    ts, nlls = [], []
    for part in seqs.split(chunk):
        part = part.to(device)
        with autocast(device):
            t, nll = masking.elbo_terms(lambda xt: model(xt, output_mask=xt == model.cfg.mask_id), part,
                                        model.cfg.mask_id, n_t=cfg.eval_draws, generator=g)
        ts.append(t)
        nlls.append(nll)
    model.train()
    t, nll = torch.cat(ts), torch.cat(nlls)
    return nll.mean().item(), masking.loss_per_t_bin(t, nll)


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else \
        torch.autocast("cpu", enabled=False)


def unigram_entropy(tokens):
    """H_1 of a token stream in nats/token: the test loss of a model that ignores every context."""
    counts = np.bincount(np.asarray(tokens))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def describe(cfg):
    if cfg.t_dist == "uniform":
        return f"MD U[{cfg.t0:g}, {cfg.t1:g}]"
    return f"MD t ~ {cfg.t_dist}(mean {cfg.t_mean:g}, std {cfg.t_std:g})"


def window_name(cfg):
    """U0.2-0.3, beta0.34-0.029, logit-normal0.34-0.5: a run's distribution of t, for folder names."""
    return f"U{cfg.t0:g}-{cfg.t1:g}" if cfg.t_dist == "uniform" else f"{cfg.t_dist}{cfg.t_mean:g}-{cfg.t_std:g}"


def summarize(cfg, history, model, seconds, unigram):
    """The run's result: its last test loss (and t-bins), the curve, and the step at which the test loss
    left the unigram plateau (first fell PLATEAU_MARGIN below H_1 of the training tokens)."""
    evals = [h for h in history if "test_loss" in h]
    trains = [h for h in history if "train_loss" in h]
    last = evals[-1]
    left = next((h["step"] for h in evals if h["test_loss"] < unigram - PLATEAU_MARGIN), None)
    return dict(parameters=model.num_params(), steps=last["step"],
                tokens=last["step"] * cfg.batch_size * cfg.block_size, seconds=round(seconds, 1),
                test_loss=last["test_loss"], test_loss_bins=last["test_loss_bins"],
                train_loss_in_window=trains[-1]["train_loss"] if trains else None,
                unigram_entropy=unigram, left_plateau_at=left,
                test_loss_curve=[(h["step"], h["test_loss"]) for h in evals])


def default_out_dir(cfg, preset):
    return os.path.join("out", "wikitext", f"{preset}_{window_name(cfg)}_s{cfg.seed}")


def auto_interval(cfg, width):
    """F.4: centre the window on the t* of the training split's n-gram statistics."""
    enc = corpus.tokenizer(cfg.tokenizer, cfg.tokenizer_file)
    ids = load_split(cfg, cfg.train_split, enc)
    with cli.user_input():
        weights, _ = theory.ngram_weights(np.asarray(ids))
    t_star = theory.language_t_star(weights, 1)
    t0, t1 = max(0.0, t_star - width / 2), min(1.0, t_star + width / 2)
    print(f"--interval auto: w_2..w_6 = {', '.join(f'{w:.4f}' for w in weights.values())}, "
          f"t* = {t_star:.3f} (linear; quadratic {theory.language_t_star(weights, 2):.3f}) -> U[{t0:.3f}, {t1:.3f}]")
    return round(t0, 4), round(t1, 4)


# ----------------------------------------------------------------------------- the sweep (Fig. 3, 7)

SWEEP_KIND = "wikitext.py --sweep"
SWEPT = ("t0", "t1", "t_dist", "t_mean", "t_std", "seed")      # what differs between the runs of a sweep
SWEEP = [dict(t0=round(i / 10, 1), t1=round((i + 1) / 10, 1)) for i in range(10)] + [dict(t0=0.0, t1=1.0)]


def parse_intervals(text):
    """'0-0.1,0.45-0.55,beta:0.34:0.029' -> the settings of each run's t: [{t0, t1}, ..., {t_dist, t_mean,
    t_std}] (uniform windows T0-T1; DIST:MEAN:STD for beta and logit-normal)."""
    out = []
    for item in text.split(","):
        try:
            if ":" in item:
                dist, mean, std = item.split(":")
                spec = dict(t_dist=dist, t_mean=float(mean), t_std=float(std))
                masking.check_t_dist(dist, spec["t_mean"], spec["t_std"])
            else:
                t0, t1 = (float(v) for v in item.split("-"))
                spec = dict(t0=t0, t1=t1)
                masking.check_interval(t0, t1)
        except ValueError as e:
            raise UserError(f"--intervals wants T0-T1 or DIST:MEAN:STD items separated by commas, got {item!r}"
                            + (f" ({e})" if "--intervals" not in str(e) and str(e) else "")) from None
        out.append(spec)
    return out


def run_dir(out_dir, cfg):
    return os.path.join(out_dir, f"run_{window_name(cfg)}_s{cfg.seed}")


def train_one(cfg, out_dir, compile_model, timeout_s, allow_change, device):
    """One run of the sweep (a job of sweep.run_jobs): finished runs are reused, interrupted ones resumed,
    ones whose --allow-change settings differ extended."""
    summary, _ = train(cfg, out_dir, device=device, resume=True, compile_model=compile_model, timeout_s=timeout_s,
                       allow_change=allow_change)
    return cfg, summary


def inputs(cfg):
    """What a run reads, as Run fingerprints it: the training and test splits."""
    return {"train": split_source(cfg, cfg.train_split), "test": split_source(cfg, cfg.eval_split)}


def print_result(result):
    cfg, s = result
    left = f"left the plateau at step {s['left_plateau_at']}" if s.get("left_plateau_at") else "still on the plateau"
    print(f"{describe(cfg)}, seed {cfg.seed}: test loss {s['test_loss']:.4f} (in-window train loss "
          f"{s['train_loss_in_window']:.4f}; {left}) in {s['seconds']:.0f}s", flush=True)


def sweep_intervals(cfg, intervals, out_dir, device="cpu", jobs=1, compile_model=False, timeout_s=600.0, seeds=None,
                    allow_change=()):
    """Train every interval (or distribution of t) for every seed, `jobs` CPU processes (or every GPU) at a
    time (finished runs with these settings and data are reused, interrupted ones resumed, a finished run
    with other settings refused, or extended when --allow-change names them) and collect the results,
    with the runs an earlier sweep of these settings left in the folder. The runs of one seed share their
    data order, and every run its test draws: they compare paired."""
    seeds = list(seeds or [cfg.seed])
    specs = [tuple(sorted(spec.items())) for spec in intervals]
    if len(set(specs)) < len(specs):
        raise UserError(f"--intervals names an interval twice: {intervals}")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds names a seed twice: {seeds}")
    configs = [replace(cfg, **spec, seed=seed) for seed in seeds for spec in intervals]
    with sweep.Collection(out_dir, SWEEP_KIND, dict(settings=asdict(cfg), intervals=intervals, seeds=seeds)) as folder:
        planned = [(c, run_dir(out_dir, c), compile_model, timeout_s, allow_change) for c in configs]
        folder.run(train_one, planned, device, jobs, ignore=BOOKKEEPING, allow_change=allow_change, inputs=inputs,
                   on_result=print_result)
        earlier = [WikiConfig(**s["settings"]) for _, s in folder.finished(asdict(cfg), SWEPT, BOOKKEEPING)]
        results = collect(configs + [c for c in earlier if run_dir(out_dir, c) not in
                                     {run_dir(out_dir, p) for p in configs}], out_dir)
        folder.finish("sweep.json", results)
    return results


def collect(configs, out_dir):
    """Every run's result (sweep.csv) and, per distribution of t, its mean and spread over seeds, and
    its paired gap to U[0, 1] of the same seed (when the sweep holds U[0, 1])."""
    runs = []
    for cfg in configs:
        with open(os.path.join(run_dir(out_dir, cfg), "summary.json")) as f:
            s = json.load(f)
        runs.append(dict(window=window_name(cfg), t_dist=cfg.t_dist, t0=cfg.t0, t1=cfg.t1, t_mean=cfg.t_mean,
                         t_std=cfg.t_std, seed=cfg.seed, test_loss=s["test_loss"],
                         train_loss_in_window=s["train_loss_in_window"], test_loss_bins=s["test_loss_bins"],
                         test_loss_curve=s["test_loss_curve"], unigram_entropy=s.get("unigram_entropy"),
                         left_plateau_at=s.get("left_plateau_at"), steps=s["steps"], seconds=s["seconds"]))
    base = {r["seed"]: r["test_loss"] for r in runs if r["window"] == "U0-1"}
    table = []
    for window in dict.fromkeys(r["window"] for r in runs):
        rs = [r for r in runs if r["window"] == window]
        losses = [r["test_loss"] for r in rs]
        gaps = [r["test_loss"] - base[r["seed"]] for r in rs if r["seed"] in base]
        table.append(dict(window=window, seeds=[r["seed"] for r in rs], test_loss=losses, mean=float(np.mean(losses)),
                          std=float(np.std(losses, ddof=1)) if len(rs) > 1 else None,
                          gap_to_U01=gaps if len(gaps) == len(rs) else None,
                          mean_gap_to_U01=float(np.mean(gaps)) if gaps and len(gaps) == len(rs) else None,
                          left_plateau_at=[r["left_plateau_at"] for r in rs],
                          unigram_entropy=rs[0]["unigram_entropy"]))
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["window", "seed", "test_loss", "train_loss_in_window", "unigram_entropy", "left_plateau_at",
                    "steps", "seconds"] + [f"bin_{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)])
        for r in runs:
            w.writerow([r["window"], r["seed"], f"{r['test_loss']:.4f}", f"{r['train_loss_in_window']:.4f}",
                        "" if r["unigram_entropy"] is None else f"{r['unigram_entropy']:.4f}", r["left_plateau_at"],
                        r["steps"], r["seconds"], *(f"{b:.4f}" for b in r["test_loss_bins"])])
    return dict(runs=runs, table=table)


def plot_sweep(results, out_dir):
    """Fig. 3 (final test loss vs window midpoint: every seed a point, the mean a line with its spread;
    U[0, 1] dashed; other distributions of t at their mean), Fig. 7 (test loss vs step, mean over
    seeds, U[0, 1] black) and the per-t-bin test loss of every window (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    windows = list(dict.fromkeys(r["window"] for r in runs))
    of = lambda w: [r for r in runs if r["window"] == w]
    centre = lambda r: (r["t0"] + r["t1"]) / 2 if r["t_dist"] == "uniform" else r["t_mean"]
    narrow = sorted((w for w in windows if w != "U0-1" and of(w)[0]["t_dist"] == "uniform"), key=lambda w: centre(of(w)[0]))
    others = [w for w in windows if w != "U0-1" and of(w)[0]["t_dist"] != "uniform"]
    mean = lambda w: float(np.mean([r["test_loss"] for r in of(w)]))
    spread = lambda w: float(np.std([r["test_loss"] for r in of(w)], ddof=1)) if len(of(w)) > 1 else 0.0

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for w in narrow + others:
        ax.plot([centre(r) for r in of(w)], [r["test_loss"] for r in of(w)], ".", color="0.6", ms=5)
    ax.errorbar([centre(of(w)[0]) for w in narrow], [mean(w) for w in narrow], yerr=[spread(w) for w in narrow],
                fmt="o-", capsize=3, label="U[t0, t1], width 0.1 (mean ± s.d. over seeds)")
    for i, w in enumerate(others):
        ax.errorbar([centre(of(w)[0])], [mean(w)], yerr=[spread(w)], fmt="s", capsize=3, color=f"C{i + 2}", label=w)
    if "U0-1" in windows:
        ax.axhline(mean("U0-1"), ls="--", color="C1", label=f"U[0, 1]: {mean('U0-1'):.3f}")
    ax.set(xlabel="interval midpoint (t0 + t1)/2, or the mean of t", ylabel="test loss (full-range bound, nats/token)",
           title="Fig. 3: test loss vs masking interval")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out_dir, "fig3_loss_vs_interval.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for w in narrow + others + (["U0-1"] if "U0-1" in windows else []):
        steps = [step for step, _ in of(w)[0]["test_loss_curve"]]
        curve = np.mean([[loss for _, loss in r["test_loss_curve"]] for r in of(w)], axis=0)
        style = dict(color="k", lw=2) if w == "U0-1" else dict(color=cmap(centre(of(w)[0])), ls="-" if w in narrow else ":")
        ax.plot(steps, curve, label=w, **style)
    ax.set(xlabel="step", ylabel="test loss (nats/token)", title="Fig. 7: test loss over training (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, os.path.join(out_dir, "fig7_loss_vs_step.png"))

    ordered = narrow + others + (["U0-1"] if "U0-1" in windows else [])
    grid = np.array([np.mean([r["test_loss_bins"] for r in of(w)], axis=0) for w in ordered])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ordered) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(10), [f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)], rotation=45, fontsize=8)
    ax.set_yticks(range(len(ordered)), ordered, fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if grid[i, j] > np.nanmean(grid) else "k")
    ax.set(xlabel="test mask ratio t (bin)", ylabel="trained on", title="test loss per t-bin (nats/token)")
    fig.colorbar(im)
    save_figure(fig, os.path.join(out_dir, "loss_per_t_bin.png"))


# ----------------------------------------------------------------------------- benchmark

def benchmark(cfg, device, compile_model, steps=20, warmup=None, profile=False):
    """Time training steps of the preset's micro-batch on random tokens (no data needed), with the
    output head on masked positions only and on every position; report tokens/s, MFU and, on
    CUDA, peak memory. profile: then print torch.profiler's top operators over 3 more steps.
    warmup: untimed steps first (default: 5, or as many as timed when fewer)."""
    warmup = min(5, steps) if warmup is None else warmup
    peak = model_lib.device_peak_flops(device)
    cuda = device.startswith("cuda")
    results = {}
    for masked_head in (True, False):
        model = model_lib.Transformer(model_config(cfg)).to(device)
        if compile_model:
            for block in model.transformer.blocks:
                block.compile()
        opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), device.split(":")[0])
        ce_fn = masking.compiled_token_ce() if compile_model else masking.token_ce
        g = torch.Generator(device).manual_seed(0)
        step = functools.partial(bench_step, model, opt, ce_fn, cfg, device, g, masked_head)
        seconds, fracs = time_steps(step, steps, warmup, device)
        frac = fracs.mean().item()
        tok_s = steps * cfg.micro_batch * cfg.block_size / seconds
        flops = model.flops_per_token(cfg.block_size, frac if masked_head else 1.0)
        name = "masked_head" if masked_head else "full_head"
        results[name] = dict(tokens_per_sec=tok_s, mfu=model_lib.estimate_mfu(flops, tok_s, peak),
                             seconds_per_step_of_full_batch=cfg.batch_size * cfg.block_size / tok_s,
                             peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None)
        mfu, mem = results[name]["mfu"], results[name]["peak_memory_gib"]
        print(f"{'masked-only head' if masked_head else 'full head       '}: {tok_s:,.0f} tok/s"
              + (f", MFU {100 * mfu:.1f}%" if mfu else "") + (f", peak memory {mem:.1f} GiB" if mem else "")
              + f", {cfg.batch_size}x{cfg.block_size} step {cfg.batch_size * cfg.block_size / tok_s:.2f}s -> "
              f"{cfg.max_steps} steps {cfg.max_steps * cfg.batch_size * cfg.block_size / tok_s / 60:.1f} min", flush=True)
        if profile and masked_head:
            print_profile(step, cuda)
    gain = results["masked_head"]["tokens_per_sec"] / results["full_head"]["tokens_per_sec"]
    print(f"masked-only head speed-up at t ~ U[{cfg.t0:g}, {cfg.t1:g}]: {gain:.2f}x")
    return dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", model=cfg.model,
                micro_batch=cfg.micro_batch, block_size=cfg.block_size, compile=compile_model,
                t0=cfg.t0, t1=cfg.t1, speedup=gain, **results)


def bench_step(model, opt, ce_fn, cfg, device, g, masked_head):
    """One training step on random tokens; returns the fraction of positions masked."""
    x0 = torch.randint(0, model.cfg.mask_id, (cfg.micro_batch, cfg.block_size), generator=g, device=device)
    with autocast(device):
        loss, masked = masking.md_step_loss(model, x0, model.cfg.mask_id, cfg.t0, cfg.t1, generator=g,
                                            stratified=cfg.stratified_t, masked_head=masked_head, ce_fn=ce_fn)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return masked.float().mean()


def print_profile(step, cuda, n_steps=3):
    """Where a step's time goes: torch.profiler's top operators by (device) time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15,
                                    max_name_column_width=60))




# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    """(flags, settings): the preset's settings, then every flag given."""
    p = cli.parser(__doc__.split("\n\n")[0] + " See README 'WikiText'.", presets=PRESETS, preset="paper", t0=0.0,
                   t1=1.0, torchrun=True)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help="Hub WikiText (raw): wikitext-103 | wikitext-2 (unless --data)")
    data.add_argument("--data", help="local folder with *train* / *valid* / *test* raw text files (no download)")
    data.add_argument("--tokenizer", help="gpt2 (tiktoken's BPE, the paper's) | bytes (the 256 byte values)")
    data.add_argument("--tokenizer-file", help="local gpt2.tiktoken rank file (no download)")
    data.add_argument("--train-split", help="the split trained on")
    data.add_argument("--eval-split", help="the split the test loss is measured on (never the training split)")
    data.add_argument("--cache-dir", help="where token caches go (keyed by the source's content and the tokenizer)")
    shape = p.add_argument_group("model and batch")
    shape.add_argument("--model", help="a model.py preset")
    shape.add_argument("--block-size", type=int, help="tokens per sequence (§5.1)")
    shape.add_argument("--batch-size", type=int, help="sequences per optimizer step, all processes together (§5.1)")
    shape.add_argument("--micro-batch", type=int, help="sequences per forward/backward, the rest accumulated")
    shape.add_argument("--full-head", dest="masked_head", action="store_false", default=None,
                       help="run the output head on every position (default: on the masked ones only)")
    shape.add_argument("--stratified-t", action=argparse.BooleanOptionalAction,
                       help="tile a micro-batch's t with one random offset (each t still uniform on [t0, t1]; "
                            "Def. 3.4 draws them independently)")
    shape.add_argument("--t-dist", help="the distribution of t: uniform (on [t0, t1], the paper's) | beta | "
                                        "logit-normal (around --t-mean with spread --t-std; t0, t1 unused)")
    shape.add_argument("--t-mean", type=float, help="beta: the mean of t; logit-normal: its median")
    shape.add_argument("--t-std", type=float, help="beta: the standard deviation of t; logit-normal: of logit t")
    optim = p.add_argument_group("optimisation (nanoGPT's GPT-2 recipe; the paper gives none)")
    optim.add_argument("--lr", type=float, help="AdamW peak learning rate")
    optim.add_argument("--min-lr", type=float, help="the cosine schedule's floor")
    optim.add_argument("--warmup", type=int, help="linear warm-up steps")
    optim.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    optim.add_argument("--beta2", type=float, help="AdamW beta2")
    optim.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: never)")
    evals = p.add_argument_group("the test loss and bookkeeping")
    evals.add_argument("--eval-every", type=int, help="steps between test-loss evaluations")
    evals.add_argument("--eval-seqs", type=int, help="test sequences scored by the full-range bound")
    evals.add_argument("--eval-draws", type=int, help="stratified t draws per test sequence")
    evals.add_argument("--log-every", type=int, help="steps between log lines")
    evals.add_argument("--ckpt-every", type=int, help="steps between checkpoints (OUT_DIR/ckpt.pt)")
    runs = p.add_argument_group("the sweep, the window from theory, the benchmark")
    runs.add_argument("--sweep", action="store_true", help="Fig. 3/7: train every interval of --intervals")
    runs.add_argument("--intervals", default=None,
                      help="--sweep: the intervals T0-T1[,T0-T1...] (default: the ten width-0.1 ones + 0-1); an item "
                           "DIST:MEAN:STD trains with t ~ beta or logit-normal instead")
    runs.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="--sweep: every interval for each of these seeds (default: --seed)")
    runs.add_argument("--jobs", type=int, default=1, help="--sweep on a CPU: runs in parallel, one thread each "
                                                          "(%(default)s; on GPUs: one run per GPU)")
    runs.add_argument("--interval", choices=["auto"], default=None,
                      help="auto: the window of --window around the t* of the training corpus (theory.py, F.4)")
    runs.add_argument("--window", type=float, default=0.1, help="width of the --interval auto window (%(default)s)")
    runs.add_argument("--benchmark", action="store_true", help="time training steps; report tokens/s and MFU")
    runs.add_argument("--bench-steps", type=int, default=20, help="timed steps per benchmark (%(default)s)")
    runs.add_argument("--profile", action="store_true", help="--benchmark: also print torch.profiler's top operators")
    return cli.parse(p, argv, WikiConfig, PRESETS)


def main(argv=None):
    a, cfg = parse_args(argv)
    bell = (cfg.t_dist != "uniform", "with --t-dist beta or logit-normal")
    cli.check_used(a, window=(a.interval == "auto", "with --interval auto"), intervals=(a.sweep, "with --sweep"),
                   seeds=(a.sweep, "with --sweep"), jobs=(a.sweep, "with --sweep"), t_mean=bell, t_std=bell,
                   bench_steps=(a.benchmark, "with --benchmark"), profile=(a.benchmark, "with --benchmark"),
                   allow_change=(a.resume or a.sweep, "with --resume (and to --sweep, to extend its runs)"))
    cli.check_interval(cfg.t0, cfg.t1)
    device = cli.pick_device(a.device)
    cli.check_positive(bench_steps=a.bench_steps, window=a.window, jobs=a.jobs)
    if a.benchmark:
        out = benchmark(cfg, device, a.compile, steps=a.bench_steps, profile=a.profile)
        if not a.dry_run:
            write_benchmark(out, a.out_dir or os.path.join("out", "wikitext", f"benchmark_{a.preset}"))
        return
    if a.interval == "auto":
        cfg = replace(cfg, **dict(zip(("t0", "t1"), auto_interval(cfg, a.window))))
    if a.sweep:
        for seed in a.seeds or []:
            cli.check_seed(seed, "seeds")
        intervals = parse_intervals(a.intervals) if a.intervals else SWEEP
        out_dir = a.out_dir or os.path.join("out", "wikitext", f"sweep_{a.preset}")
        results = sweep_intervals(cfg, intervals, out_dir, device, a.jobs, a.compile, a.dist_timeout, a.seeds,
                                  a.allow_change)
        for r in results["table"]:
            gap = "" if r["mean_gap_to_U01"] is None else f", paired gap to U[0, 1] {r['mean_gap_to_U01']:+.4f}"
            print(f"{r['window']:>16}: test loss {r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] else "") +
                  f" over seeds {r['seeds']}{gap}; left the plateau at {r['left_plateau_at']}")
        if a.plot:
            plot_sweep(results, out_dir)
        print(f"wrote {out_dir}/sweep.json, sweep.csv" + (", fig3_loss_vs_interval.png, fig7_loss_vs_step.png, "
                                                           "loss_per_t_bin.png" if a.plot else ""))
        return
    out_dir = a.out_dir or default_out_dir(cfg, a.preset)
    summary, _ = train(cfg, out_dir, device=device, resume=a.resume, compile_model=a.compile, dry_run=a.dry_run,
                       allow_change=a.allow_change, timeout_s=a.dist_timeout)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if summary.get("done"):
        return
    print(f"{describe(cfg)}: test loss {summary['test_loss']:.4f} nats/token (full-range bound), in-window train "
          f"loss {summary['train_loss_in_window']:.4f}, {summary['steps']} steps, {summary['seconds']:.0f}s")
    print("test loss per t-bin: " + " ".join(f"{b:.2f}" for b in summary["test_loss_bins"]))
    if not a.dry_run:
        print(f"wrote {out_dir}/summary.json")


if __name__ == "__main__":
    cli.run_cli(main)
