"""
The 50M masked-diffusion language model on WikiText and the interval sweep (paper §5-5.1, App. F.3-F.4).

    python wikitext.py --t0 0.45 --t1 0.55               # one run, the paper's setting (WikiText-103, 6000 steps)
    python wikitext.py --sweep                           # Fig. 3/7: ten width-0.1 intervals + U[0, 1]
    python wikitext.py --preset cpu --sweep              # the same sweep, CPU-sized, on WikiText-2
    python wikitext.py --interval auto                   # the window around the corpus's t* (theory.py)
    python wikitext.py --benchmark --device cuda         # tokens/s and MFU of training steps
    torchrun --nproc_per_node=8 wikitext.py              # DDP

Training draws t ~ U[t0, t1] and minimises masking.md_loss; the test loss is the
full-range bound masking.elbo_nll (t over all of [0, 1], whatever the training
window), on the test split, with the same fixed draws for every run, so the runs
compare exactly (§5). Data: GPT-2 BPE (tiktoken) cached once as uint16 memmaps.
"""
import argparse
import csv
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import common
import masking
import model as model_lib
import theory

@dataclass
class WikiConfig:
    model: str = "wikitext-50m"       # a model.py preset
    dataset: str = "wikitext-103"     # Hub WikiText (raw), unless --data gives local files
    data: str = ""                    # local folder with *train* / *valid* / *test* raw text files
    tokenizer_file: str = ""          # local gpt2.tiktoken (no download)
    train_split: str = "train"        # split trained on
    eval_split: str = "test"          # split the test loss is measured on
    cache_dir: str = "data"           # token caches (keyed by the source files and the tokenizer)
    block_size: int = 150             # tokens per sequence (§5.1)
    batch_size: int = 1024            # sequences per optimizer step (§5.1)
    micro_batch: int = 512            # sequences per forward/backward, the rest accumulated (1024 fits an H200)
    max_steps: int = 6000
    lr: float = 6e-4                  # AdamW peak learning rate
    min_lr: float = 6e-5              # cosine schedule's floor
    warmup: int = 300                 # linear warm-up steps
    weight_decay: float = 0.1         # AdamW weight decay
    beta2: float = 0.95               # AdamW beta2
    grad_clip: float = 1.0            # clip the gradient norm to this (0: never)
    t0: float = 0.0
    t1: float = 1.0
    eval_every: int = 250             # steps between test-loss evaluations
    eval_seqs: int = 512              # test sequences scored by the full-range bound
    eval_draws: int = 8               # stratified t draws per test sequence
    log_every: int = 10               # steps between log lines
    ckpt_every: int = 250             # steps between checkpoints (OUT_DIR/ckpt.pt)
    masked_head: bool = True          # run the output head on masked positions only
    stratified_t: bool = True         # t of a micro-batch tiled by one offset (each still U[t0, t1]); Def. 3.4 draws them independently
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

SWEEP = [(round(i / 10, 1), round((i + 1) / 10, 1)) for i in range(10)] + [(0.0, 1.0)]
EVAL_SEED = 1234            # the test loss's masks: one generator seeded so, every run and every evaluation alike


# ----------------------------------------------------------------------------- data

def local_split(folder, split):
    """The file of `folder` whose name contains `split` (wiki.test.raw, test.txt, ...): the first, sorted."""
    if not os.path.isdir(folder):
        raise common.UserError(f"--data {folder} is not a folder")
    names = [f for f in sorted(os.listdir(folder)) if split in f and f.endswith((".raw", ".txt"))]
    if not names:
        raise common.UserError(f"no *{split}*.raw or *{split}*.txt file in {folder}")
    return os.path.join(folder, names[0])


def file_id(path):
    """What identifies a file's content cheaply: where it is, its size and its modification time."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cache_path(cfg, split):
    """The token cache of a split, keyed by its source (the local file's path, size and mtime, or the
    Hub name) and the tokenizer: another folder of the same name, or a file edited in place, gets
    its own cache instead of another's tokens."""
    source = file_id(local_split(cfg.data, split)) if cfg.data else ["hub", cfg.dataset, split]
    tokenizer = file_id(cfg.tokenizer_file) if cfg.tokenizer_file else "tiktoken gpt2"
    key = hashlib.sha1(json.dumps([source, tokenizer]).encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(cfg.data)) if cfg.data else cfg.dataset
    return os.path.join(cfg.cache_dir, f"{name}-{key}", f"{split}.bin")


def encode_split(text, enc):
    return np.array(enc.encode_ordinary(text), dtype=np.uint16)


def load_tokens(cfg, split, enc):
    """Token ids of a split as a uint16 memmap, tokenised once and cached (nanoGPT's train.bin)."""
    path = cache_path(cfg, split)
    if not os.path.exists(path):
        text = (common.read_text(local_split(cfg.data, split), "--data file") if cfg.data else
                common.wikitext_hub_text(cfg.dataset, split))
        ids = encode_split(text, enc)
        if len(ids) == 0:
            raise common.UserError(f"the {split} split of {cfg.data or cfg.dataset} holds no text")
        tmp = f"{path}.{os.getpid()}.tmp"   # one per process: under torchrun every rank may write the cache
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ids.tofile(tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise common.UserError(f"--cache-dir {cfg.cache_dir} cannot be written ({e.strerror or type(e).__name__})") \
                from None
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(tokens, n, block_size, generator):
    """n random windows of block_size tokens (nanoGPT's get_batch); the generator is the data position."""
    starts = torch.randint(0, len(tokens) - block_size, (n,), generator=generator)
    return torch.from_numpy(np.stack([tokens[s:s + block_size] for s in starts.tolist()]).astype(np.int64))


def eval_sequences(tokens, cfg):
    """The fixed test set: the first eval_seqs non-overlapping windows of the split."""
    n = min(cfg.eval_seqs, len(tokens) // cfg.block_size)
    return torch.from_numpy(np.array(tokens[: n * cfg.block_size], dtype=np.int64).reshape(n, cfg.block_size))


# ----------------------------------------------------------------------------- evaluation

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


# ----------------------------------------------------------------------------- training

SCRIPT = "wikitext.py"
DATA_SEED_STRIDE = 1000     # rank r of a run seeded s draws batches from s * stride + r, masks from the next
BOOKKEEPING = ("log_every", "ckpt_every", "cache_dir")


def check_config(cfg, model_cfg):
    common.check_positive(batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, block_size=cfg.block_size)
    common.check_interval(cfg.t0, cfg.t1)
    if cfg.block_size > model_cfg.block_size:
        raise common.UserError(f"--block-size {cfg.block_size} exceeds the model's {model_cfg.block_size}")
    if cfg.batch_size % cfg.micro_batch:
        raise common.UserError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch {cfg.micro_batch}")
    if cfg.data and not os.path.isdir(cfg.data):
        raise common.UserError(f"--data {cfg.data} is not a folder")
    if cfg.tokenizer_file and not os.path.exists(cfg.tokenizer_file):
        raise common.UserError(f"--tokenizer-file {cfg.tokenizer_file} does not exist")
    common.check_positive(max_steps=cfg.max_steps, eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every,
                          log_every=cfg.log_every, eval_seqs=cfg.eval_seqs, eval_draws=cfg.eval_draws)
    common.check_optimizer(cfg)
    check_splits(cfg)


def check_splits(cfg):
    """The test loss is never measured on the split trained on: other split names, and (local files,
    matched by name) other files."""
    if cfg.train_split == cfg.eval_split or {cfg.train_split, cfg.eval_split} <= {"valid", "validation"}:
        raise common.UserError(f"--eval-split {cfg.eval_split} is the split trained on (--train-split "
                               f"{cfg.train_split}): the test loss would be measured on training text")
    if cfg.data and local_split(cfg.data, cfg.train_split) == local_split(cfg.data, cfg.eval_split):
        raise common.UserError(f"--train-split {cfg.train_split} and --eval-split {cfg.eval_split} both pick "
                               f"{local_split(cfg.data, cfg.train_split)}: name the splits so they match other files")


def build(cfg, device, compile_model):
    """The model and the tokenizer of a run whose settings check_config has passed."""
    with common.user_input():
        model_cfg = model_lib.get_config(cfg.model)
    enc = common.gpt2_tokenizer(cfg.tokenizer_file or None)
    with common.user_input():
        masking.check_mask_id(model_cfg.mask_id, enc.n_vocab, model_cfg.vocab_size)
    model = model_lib.Transformer(model_cfg).to(device)
    if compile_model:                  # per block: the masked-only head stays eager (data-dependent shape)
        for block in model.transformer.blocks:
            block.compile()
    return model, enc


def loss_ce(compile_model):
    """The per-token CE of the loss; compiled, its fp32 upcast fuses into the softmax (a third
    of the GPU time of a step at this vocabulary when eager). dynamic: the masked count varies."""
    return torch.compile(masking.token_ce, dynamic=True) if compile_model else masking.token_ce


def micro_loss(model, x0, mask_id, cfg, generator, device, ce_fn, masked_head=True):
    """masking.md_step_loss on a micro-batch, under bf16 autocast on CUDA. t is stratified over the
    micro-batch (stratified_t: one offset, each t still uniform on [t0, t1]; Def. 3.4 draws them
    independently), which lowers the variance of the small-batch loss."""
    with autocast(device):
        return masking.md_step_loss(model, x0, mask_id, cfg.t0, cfg.t1, generator=generator,
                                    stratified=cfg.stratified_t, masked_head=masked_head, ce_fn=ce_fn)


def default_out_dir(cfg, preset):
    return os.path.join("out", "wikitext", common.run_name(preset, common.interval_name(cfg.t0, cfg.t1),
                                                           f"s{cfg.seed}"))


def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, dry_run=False, quiet=False,
          allow_change=(), timeout_s=600.0):
    """One run (DDP under torchrun): writes out_dir/{run.json, ckpt.pt, history.json, summary.json};
    returns (summary, history) on rank 0 (those of the finished run when out_dir holds this very run)."""
    rank, world, device = common.setup_distributed(device, timeout_s)
    try:
        with common.user_input():
            model_cfg = model_lib.get_config(cfg.model)
        common.on_every_rank(check_config, cfg, model_cfg)
        ckpt = os.path.join(out_dir, "ckpt.pt")
        state = "fresh" if dry_run else common.broadcast(common.on_every_rank(
            lambda: claim(out_dir, cfg, resume, ckpt) if rank == 0 else None))
        if state == "done":
            return common.finished_run(out_dir)
        saved = common.on_every_rank(read_checkpoint, cfg, ckpt, allow_change) if state == "resume" else None
        run = common.on_every_rank(build_run, cfg, device, compile_model, world, rank)
        if saved is not None:
            common.on_every_rank(resume_run, run, saved, ckpt)
        if rank == 0 and not dry_run:
            common.mark_run(out_dir, SCRIPT, asdict(cfg))
            common.LAST_CHECKPOINT_NOTE = lambda: f"the last complete checkpoint is {ckpt}" + (
                f" (step {run['saved']})" if run["saved"] is not None else " (none yet)")
        return loop(run, cfg, out_dir, device, world, rank, dry_run, quiet)
    finally:
        common.release_locks(os.path.join(out_dir, common.LOCK_FILE))
        common.teardown()


def claim(out_dir, cfg, resume, ckpt):
    state = common.claim_out_dir(out_dir, SCRIPT, asdict(cfg), resume=resume, has_checkpoint=os.path.exists(ckpt),
                                 ignore=BOOKKEEPING)
    if state != "done":
        common.take_out_dir(out_dir)
    return state


def build_run(cfg, device, compile_model, world, rank):
    """The model, its data, optimizer and generators: what the loop carries from step to step."""
    common.set_seed(cfg.seed + rank)
    model, enc = build(cfg, device, compile_model)
    train_tokens = load_tokens(cfg, cfg.train_split, enc)
    test_seqs = eval_sequences(load_tokens(cfg, cfg.eval_split, enc), cfg)
    if len(train_tokens) <= cfg.block_size:
        raise common.UserError(f"the {cfg.train_split} split has only {len(train_tokens)} tokens")
    if len(test_seqs) == 0:
        raise common.UserError(f"the {cfg.eval_split} split has fewer than {cfg.block_size} tokens")
    accum = cfg.batch_size // (cfg.micro_batch * world)
    if accum < 1:
        raise common.UserError(f"--batch-size {cfg.batch_size} < --micro-batch {cfg.micro_batch} x {world} processes")
    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), device.split(":")[0])
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[int(device.split(":")[1])] if ":" in device else None)
    return dict(model=model, ddp=ddp, opt=opt, ce_fn=loss_ce(compile_model), train_tokens=train_tokens,
                test_seqs=test_seqs, accum=accum,
                data_gen=torch.Generator().manual_seed(cfg.seed * DATA_SEED_STRIDE + rank),
                mask_gen=torch.Generator(device).manual_seed(cfg.seed * DATA_SEED_STRIDE + rank + 1),
                step=0, history=[], seconds=0.0, changes={}, saved=None)


def read_checkpoint(cfg, ckpt, allow_change):
    """The checkpoint to resume, read and its settings checked before any work (a corrupt file or
    changed settings cost nothing)."""
    state = common.load_checkpoint(ckpt)
    state["changes"] = {**state.get("changes", {}), **common.check_resume_settings(
        state["config"], asdict(cfg), ckpt, allow_change, ignore=BOOKKEEPING)}
    return state


def resume_run(run, state, ckpt):
    run["changes"] = state["changes"]
    common.restore(run["model"], state["model"], ckpt)
    common.restore(run["opt"], state["opt"], ckpt)
    run["data_gen"].set_state(state["data_gen"])
    run["mask_gen"].set_state(state["mask_gen"])
    common.set_rng_state(state["rng"])
    run.update(step=state["step"], history=state["history"], seconds=state.get("seconds", 0.0), saved=state["step"])


def loop(run, cfg, out_dir, device, world, rank, dry_run, quiet):
    """The training loop: steps, log lines, test-loss evaluations, checkpoints; then the summary."""
    master = rank == 0
    log = (lambda *a, **k: None) if quiet or not master else print
    model, step = run["model"], run["step"]
    if step:
        log(f"resumed {os.path.join(out_dir, 'ckpt.pt')} at step {step}")
    max_steps = min(cfg.max_steps, step + 2) if dry_run else cfg.max_steps
    log(f"{describe(cfg)}: {model.num_params():,} parameters ({cfg.model}), {len(run['train_tokens']):,} train tokens, "
        f"{len(run['test_seqs'])} test sequences, batch {cfg.batch_size} x {cfg.block_size} "
        f"({run['accum']} x {cfg.micro_batch} x {world} proc), {max_steps} steps on {device}")
    progress, t_log, window = common.Progress(max_steps, start=step), time.time(), []
    while run["step"] < max_steps:
        loss, masked_frac = train_step(run, cfg, device, world)
        window.append(loss)
        step = run["step"]
        if step % cfg.log_every == 0 or step == max_steps:
            tok_s = len(window) * cfg.batch_size * cfg.block_size / (time.time() - t_log)
            mfu = model_lib.estimate_mfu(model.flops_per_token(cfg.block_size, masked_frac if cfg.masked_head else 1),
                                         tok_s, model_lib.device_peak_flops(device))
            log(f"step {step:5d} | loss {sum(window) / len(window):.4f} (in-window) | lr {lr_at(step - 1, cfg):.2e} | "
                f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | {progress.eta(step)}",
                flush=True)
            run["history"].append(dict(step=step, train_loss=sum(window) / len(window), tokens_per_sec=tok_s,
                                       seconds=run["seconds"] + progress.elapsed()))
            t_log, window = time.time(), []
        if step % cfg.eval_every == 0 or step == max_steps:
            test_loss, bins = evaluate(model, run["test_seqs"], cfg, device)
            run["history"].append(dict(step=step, test_loss=test_loss, test_loss_bins=bins))
            log(f"step {step:5d} | test loss {test_loss:.4f} (full-range bound, nats/token)")
        if master and not dry_run and (step % cfg.ckpt_every == 0 or step == max_steps):
            save(run, cfg, os.path.join(out_dir, "ckpt.pt"), run["seconds"] + progress.elapsed())
    seconds = run["seconds"] + progress.elapsed()
    summary = summarize(cfg, run["history"], model, seconds)
    if run["changes"]:
        summary["changed_on_resume"] = run["changes"]          # {setting: [checkpoint's, now]}
    if master and not dry_run:
        common.write_json(os.path.join(out_dir, "history.json"), run["history"])
        common.write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary, run["history"]


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to min_lr at max_steps (nanoGPT): common.lr_at."""
    return common.lr_at(step, cfg.lr, warmup=cfg.warmup, max_steps=cfg.max_steps, schedule="cosine",
                        min_lr=cfg.min_lr)


def train_step(run, cfg, device, world):
    """One optimizer step over `accum` micro-batches. Returns (loss averaged over the processes,
    the masked share); a non-finite loss stops the run in one line naming the last checkpoint."""
    for group in run["opt"].param_groups:
        group["lr"] = lr_at(run["step"], cfg)
    loss_sum = torch.zeros((), device=device)      # summed on the device: one host sync per step, not per micro-batch
    masked_frac = torch.zeros((), device=device)
    for micro in range(run["accum"]):
        x0 = get_batch(run["train_tokens"], cfg.micro_batch, cfg.block_size, run["data_gen"]).to(device)
        if world > 1:
            run["ddp"].require_backward_grad_sync = micro == run["accum"] - 1
        loss, masked = micro_loss(run["ddp"], x0, run["model"].cfg.mask_id, cfg, run["mask_gen"], device, run["ce_fn"],
                                  cfg.masked_head)
        loss = loss / run["accum"]
        loss.backward()
        loss_sum += loss.detach()
        masked_frac += masked.float().mean() / run["accum"]
    if world > 1:                  # log the mean over processes, not rank 0's share
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= world
    loss_sum, masked_frac = loss_sum.item(), masked_frac.item()
    if not math.isfinite(loss_sum):
        raise common.UserError(f"the training loss became {loss_sum} at step {run['step'] + 1}; stopped. " +
                               (common.LAST_CHECKPOINT_NOTE() if common.LAST_CHECKPOINT_NOTE else "") +
                               "; lower --lr, or check the data")
    common.clip_gradients(run["model"].parameters(), cfg.grad_clip)
    run["opt"].step()
    run["opt"].zero_grad(set_to_none=True)
    run["step"] += 1
    return loss_sum, masked_frac


def save(run, cfg, path, seconds):
    common.atomic_torch_save(dict(model=run["model"].state_dict(), opt=run["opt"].state_dict(), step=run["step"],
                                  data_gen=run["data_gen"].get_state(), mask_gen=run["mask_gen"].get_state(),
                                  rng=common.rng_state(), history=run["history"], config=asdict(cfg),
                                  changes=run["changes"], seconds=seconds), path)
    run["saved"] = run["step"]


def describe(cfg):
    return f"MD U[{cfg.t0:g}, {cfg.t1:g}]"


def summarize(cfg, history, model, seconds):
    evals = [h for h in history if "test_loss" in h]
    trains = [h for h in history if "train_loss" in h]
    last = evals[-1]
    return dict(script=SCRIPT, settings=asdict(cfg), parameters=model.num_params(), steps=last["step"],
                tokens=last["step"] * cfg.batch_size * cfg.block_size, seconds=round(seconds, 1),
                test_loss=last["test_loss"], test_loss_bins=last["test_loss_bins"],
                train_loss_in_window=trains[-1]["train_loss"] if trains else None,
                test_loss_curve=[(h["step"], h["test_loss"]) for h in evals])


# ----------------------------------------------------------------------------- the sweep (Fig. 3, 7)

def run_dir(out_dir, t0, t1):
    return os.path.join(out_dir, f"run_{t0:g}-{t1:g}")


def parse_intervals(text):
    """'0-0.1,0.45-0.55' -> [(0.0, 0.1), (0.45, 0.55)]"""
    try:
        out = [tuple(float(v) for v in item.split("-")) for item in text.split(",")]
    except ValueError:
        raise common.UserError(f"--intervals wants T0-T1[,T0-T1...], got {text!r}") from None
    for iv in out:
        if len(iv) != 2:
            raise common.UserError(f"--intervals wants T0-T1[,T0-T1...], got {text!r}")
        masking.check_interval(*iv)
    return out


def child_argv(argv, t0, t1, device, out):
    """This command's flags for one run of the sweep on one device."""
    drop = {"--sweep", "--t0", "--t1", "--device", "--out-dir", "--intervals"}
    kept, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok.split("=")[0] in drop:
            skip = "=" not in tok and tok not in ("--sweep",)
            continue
        kept.append(tok)
    return [sys.executable, os.path.abspath(__file__), *kept, "--t0", str(t0), "--t1", str(t1),
            "--device", device, "--out-dir", out]


def sweep(cfg, intervals, out_dir, device, compile_model, argv, timeout_s=600.0):
    """Train every interval (finished runs with these settings are reused, interrupted ones resumed;
    a finished run with other settings is refused) and collect the results. With several visible
    GPUs the runs are spread over them, one process per GPU."""
    if len(set(intervals)) < len(intervals):
        raise common.UserError(f"--intervals names an interval twice: {intervals}")
    for t0, t1 in intervals:
        done = common.finished_settings(run_dir(out_dir, t0, t1))
        if done is not None and not common.same_settings(done, asdict(replace(cfg, t0=t0, t1=t1)), BOOKKEEPING):
            raise common.UserError(f"{run_dir(out_dir, t0, t1)} holds a finished run with other settings; choose "
                                   f"another --out-dir")
    common.claim_collection(out_dir, SWEEP_KIND, dict(settings=asdict(cfg), intervals=intervals))
    todo = [iv for iv in intervals if not os.path.exists(os.path.join(run_dir(out_dir, *iv), "summary.json"))]
    print(f"--sweep: {len(intervals)} runs, {len(intervals) - len(todo)} already done")
    n_gpu = torch.cuda.device_count() if device.startswith("cuda") else 0
    if n_gpu > 1 and todo:
        queue, running = list(todo), []
        while queue or running:
            busy = {d for d, _, _ in running}
            for gpu in range(n_gpu):
                if queue and gpu not in busy:
                    t0, t1 = queue.pop(0)
                    running.append((gpu, subprocess.Popen(child_argv(argv, t0, t1, f"cuda:{gpu}",
                                                                     run_dir(out_dir, t0, t1))), (t0, t1)))
            time.sleep(5)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                if item[1].returncode:
                    raise common.UserError(f"a sweep run on cuda:{item[0]} failed (exit {item[1].returncode}); its "
                                           f"folder {run_dir(out_dir, *item[2])} keeps its checkpoint: rerun the sweep")
    else:
        for t0, t1 in todo:
            s, _ = train(replace(cfg, t0=t0, t1=t1), run_dir(out_dir, t0, t1), device=device, resume=True,
                         compile_model=compile_model, timeout_s=timeout_s)
            print(f"U[{t0:g}, {t1:g}]: test loss {s['test_loss']:.4f} (in-window train loss "
                  f"{s['train_loss_in_window']:.4f}) in {s['seconds']:.0f}s", flush=True)
    results = collect(intervals, out_dir)
    common.release_locks(os.path.join(out_dir, common.LOCK_FILE))
    return results


SWEEP_KIND = "wikitext.py --sweep"


def collect(intervals, out_dir):
    runs = []
    for t0, t1 in intervals:
        with open(os.path.join(run_dir(out_dir, t0, t1), "summary.json")) as f:
            s = json.load(f)
        runs.append(dict(t0=t0, t1=t1, test_loss=s["test_loss"], train_loss_in_window=s["train_loss_in_window"],
                         test_loss_bins=s["test_loss_bins"], test_loss_curve=s["test_loss_curve"],
                         steps=s["steps"], seconds=s["seconds"]))
    results = dict(script=SWEEP_KIND, runs=runs)
    common.write_json(os.path.join(out_dir, "sweep.json"), results)
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t0", "t1", "test_loss", "train_loss_in_window", "steps", "seconds"] +
                   [f"bin_{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)])
        for r in runs:
            w.writerow([r["t0"], r["t1"], f"{r['test_loss']:.4f}", f"{r['train_loss_in_window']:.4f}", r["steps"],
                        r["seconds"], *(f"{b:.4f}" for b in r["test_loss_bins"])])
    return results


def plot_sweep(results, out_dir):
    """Fig. 3 (final test loss vs interval midpoint, U[0,1] dashed), Fig. 7 (test loss vs step,
    baseline black) and the per-t-bin test loss of every run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    base = [r for r in runs if (r["t0"], r["t1"]) == (0.0, 1.0)]
    narrow = sorted((r for r in runs if (r["t0"], r["t1"]) != (0.0, 1.0)), key=lambda r: r["t0"] + r["t1"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([(r["t0"] + r["t1"]) / 2 for r in narrow], [r["test_loss"] for r in narrow], "o-", label="U[t0, t1]")
    if base:
        ax.axhline(base[0]["test_loss"], ls="--", color="C0", label=f"U[0, 1]: {base[0]['test_loss']:.3f}")
    ax.set(xlabel="interval midpoint (t0 + t1)/2", ylabel="test loss (full-range bound, nats/token)",
           title="Fig. 3: test loss vs masking interval")
    ax.legend()
    common.save_figure(fig, os.path.join(out_dir, "fig3_loss_vs_interval.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for r in narrow:
        steps, losses = zip(*r["test_loss_curve"])
        ax.plot(steps, losses, color=cmap((r["t0"] + r["t1"]) / 2), label=f"[{r['t0']:g}, {r['t1']:g}]")
    for r in base:
        steps, losses = zip(*r["test_loss_curve"])
        ax.plot(steps, losses, color="k", lw=2, label="[0, 1]")
    ax.set(xlabel="step", ylabel="test loss (nats/token)", title="Fig. 7: test loss over training")
    ax.legend(fontsize=7, ncol=2)
    common.save_figure(fig, os.path.join(out_dir, "fig7_loss_vs_step.png"))

    ordered = narrow + base
    grid = np.array([r["test_loss_bins"] for r in ordered])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ordered) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(10), [f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)], rotation=45, fontsize=8)
    ax.set_yticks(range(len(ordered)), [f"U[{r['t0']:g}, {r['t1']:g}]" for r in ordered], fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if grid[i, j] > np.nanmean(grid) else "k")
    ax.set(xlabel="test mask ratio t (bin)", ylabel="trained on", title="test loss per t-bin (nats/token)")
    fig.colorbar(im)
    common.save_figure(fig, os.path.join(out_dir, "loss_per_t_bin.png"))


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
        model = model_lib.Transformer(model_lib.get_config(cfg.model)).to(device)
        if compile_model:
            for block in model.transformer.blocks:
                block.compile()
        opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), device.split(":")[0])
        ce_fn = loss_ce(compile_model)
        g = torch.Generator(device).manual_seed(0)
        step = functools.partial(bench_step, model, opt, ce_fn, cfg, device, g, masked_head)
        seconds, fracs = common.time_steps(step, steps, warmup, device)
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
    x0 = torch.randint(0, 50257, (cfg.micro_batch, cfg.block_size), generator=g, device=device)
    loss, masked = micro_loss(model, x0, model.cfg.mask_id, cfg, g, device, ce_fn, masked_head)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See README 'WikiText'.")
    common.add_common_args(p, presets=PRESETS, preset="paper", t0=0.0, t1=1.0)
    common.add_config_args(p, WikiConfig, PRESETS["paper"], "paper preset",
                           skip=("t0", "t1", "seed", "max_steps", "masked_head"))
    common.add_dist_args(p)
    p.add_argument("--full-head", action="store_true", help="run the output head on every position")
    p.add_argument("--sweep", action="store_true", help="Fig. 3/7: train every interval of --intervals")
    p.add_argument("--intervals", default=None,
                   help="--sweep: the intervals T0-T1[,T0-T1...] (default: the ten width-0.1 ones + 0-1)")
    p.add_argument("--interval", choices=["auto"], default=None,
                   help="auto: the window of --window around the t* of the training corpus (theory.py, F.4)")
    p.add_argument("--window", type=float, default=0.1, help="width of the --interval auto window (%(default)s)")
    p.add_argument("--benchmark", action="store_true", help="time training steps; report tokens/s and MFU")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps per benchmark (%(default)s)")
    p.add_argument("--profile", action="store_true", help="--benchmark: also print torch.profiler's top operators")
    return p.parse_args(argv)


def config_from_args(a):
    return replace(common.config_from_args(a, WikiConfig, PRESETS), masked_head=not a.full_head)


def auto_interval(cfg, width):
    """F.4: centre the window on the t* of the training split's n-gram statistics."""
    enc = common.gpt2_tokenizer(cfg.tokenizer_file or None)
    ids = load_tokens(cfg, cfg.train_split, enc)
    with common.user_input():
        weights, _ = theory.ngram_weights(np.asarray(ids))
    t_star = theory.language_t_star(weights, 1)
    t0, t1 = max(0.0, t_star - width / 2), min(1.0, t_star + width / 2)
    print(f"--interval auto: w_2..w_6 = {', '.join(f'{w:.4f}' for w in weights.values())}, "
          f"t* = {t_star:.3f} (linear; quadratic {theory.language_t_star(weights, 2):.3f}) -> U[{t0:.3f}, {t1:.3f}]")
    return round(t0, 4), round(t1, 4)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    cfg = config_from_args(a)
    common.check_interval(cfg.t0, cfg.t1)
    device = common.pick_device(a.device)
    if a.benchmark:
        common.check_positive(bench_steps=a.bench_steps)
        out_dir = a.out_dir or os.path.join("out", "wikitext", f"benchmark_{a.preset}")
        if not a.dry_run:
            common.prepare_out_dir(out_dir)
        out = benchmark(cfg, device, a.compile, steps=a.bench_steps, profile=a.profile)
        if not a.dry_run:
            common.write_json(os.path.join(out_dir, "benchmark.json"), out)
        return
    if a.interval == "auto":
        common.check_positive(window=a.window)
        cfg = replace(cfg, **dict(zip(("t0", "t1"), auto_interval(cfg, a.window))))
    if a.sweep:
        intervals = parse_intervals(a.intervals) if a.intervals else SWEEP
        out_dir = a.out_dir or os.path.join("out", "wikitext", f"sweep_{a.preset}_s{cfg.seed}")
        results = sweep(cfg, intervals, out_dir, device, a.compile, argv, a.dist_timeout)
        for r in results["runs"]:
            print(f"U[{r['t0']:g}, {r['t1']:g}]  test loss {r['test_loss']:.4f}  "
                  f"bins {' '.join(f'{b:.2f}' for b in r['test_loss_bins'])}")
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
        print(common.already_done(out_dir, ("test_loss", "steps")))
        return
    print(f"{describe(cfg)}: test loss {summary['test_loss']:.4f} nats/token (full-range bound), in-window train "
          f"loss {summary['train_loss_in_window']:.4f}, {summary['steps']} steps, {summary['seconds']:.0f}s")
    print("test loss per t-bin: " + " ".join(f"{b:.2f}" for b in summary["test_loss_bins"]))
    if not a.dry_run:
        print(f"wrote {out_dir}/summary.json")


if __name__ == "__main__":
    common.run_cli(main)
