"""
The machinery the LLaDA-8B scripts share (pretrain_8b.py, sft_8b.py, eval_8b.py), in torchtitan's
shape without its framework: one small function per concern.

    torchrun setup and rank agreement -> tokenizer -> FSDP2 model on `meta` -> the training loop over
    data slots (pre-training's and SFT's) -> DCP checkpoints and resume -> LLaDA-format export,
    plus the --dry-run plan, --benchmark and Fig. 4's plot.

No science lives here: the loss and masks are masking.py's, the network model.py's. Every rank runs
the same code; rank 0 alone prints and writes shared files; a user error is agreed on by every rank
(`on_every_rank`) so that all of them exit with the same one line.
"""
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

import common
import masking
import model as model_lib

LLADA = "GSAI-ML/LLaDA-8B-Base"


# ----------------------------------------------------------------------------- distributed setup

def setup_distributed(device):
    """One process per GPU under torchrun (NCCL; gloo on CPUs). A plain `python` run is a world of
    one, so FSDP2 and the sharded checkpoints run the same way everywhere. Returns (rank, world, device)."""
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)                       # torchrun's environment
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    global CONTROL, SAVING     # CPU flags (errors, lengths) travel over gloo: no wait on the GPU's queue;
    CONTROL = dist.new_group(backend="gloo") if cuda else None      # async saves have a group of their own
    SAVING = dist.new_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), device


CONTROL = SAVING = None


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(error, device=None):
    """Every rank says whether it hit a user error; if any did, every rank raises the first one's
    message, so no rank is left waiting in a collective. One all-reduce of a CPU flag when all is
    well (over gloo, so it never waits for the GPU to drain)."""
    failed = torch.tensor([1.0 if error else 0.0])
    dist.all_reduce(failed, group=CONTROL)
    if failed.item():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, error, group=CONTROL)
        raise ValueError(next(m for m in messages if m))


def on_every_rank(fn, device, *args):
    """fn(*args) on every rank, its user errors (ValueError, OSError) agreed on by all ranks."""
    out, error = None, None
    try:
        out = fn(*args)
    except (ValueError, OSError) as e:
        error = str(e)
    agree(error, device)
    return out


# ----------------------------------------------------------------------------- tokenizer

SPECIALS = ["<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]       # LLaDA's EOS, MASK, BOS and chat-template tokens


def byte_tokenizer():
    """256 byte ids, then LLaDA's special tokens (EOS = 256, MASK = 257, BOS, and the chat template's
    header and end-of-turn tokens), as a `tokenizers` Tokenizer: no file, no download, and it saves
    and loads like LLaDA's tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    tok = Tokenizer(models.BPE(vocab={f"<0x{b:02X}>": b for b in range(256)}, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tok


def load_tokenizer(name):
    """"" -> bytes; a tokenizer.json file, or a folder holding one; anything else a Hub id."""
    from tokenizers import Tokenizer
    if not name:
        return byte_tokenizer()
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    local = os.path.exists(path) or name.startswith((".", "/")) or name.endswith(".json")
    if local and not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    try:
        return Tokenizer.from_file(path) if local else Tokenizer.from_pretrained(name)
    except Exception as e:      # offline, unknown Hub id, not a tokenizer.json
        raise ValueError(f"could not load tokenizer {name!r} ({type(e).__name__}); pass --tokenizer with a local "
                         f"tokenizer.json, or '' for bytes") from None


def token_ids(tok, model_cfg=None):
    """EOS, MASK (and BOS when there is one) of a tokenizer, its vocabulary size (one past the
    largest id) and its special ids (which text never encodes to)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = dict(eos=tok.token_to_id("<|endoftext|>"), mask=tok.token_to_id("<|mdm_mask|>"),
               bos=tok.token_to_id("<|startoftext|>"), vocab=max(vocab.values()) + 1,
               special={i for i, t in tok.get_added_tokens_decoder().items() if t.special})
    if ids["eos"] is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to end documents with")
    if ids["mask"] is None:
        if model_cfg is None:
            raise ValueError("the tokenizer has no <|mdm_mask|> token")
        ids["mask"] = model_cfg.mask_id
    return ids


def model_config(preset, ids, **overrides):
    """The model preset, its vocabulary sized from the tokenizer where the preset is not LLaDA's
    (LLaDA keeps its padded 126,464), checked: every id fits, MASK is no real token."""
    cfg = model_lib.get_config(preset, **overrides)
    if not preset.startswith("llada"):
        cfg = replace(cfg, vocab_size=ids["vocab"], mask_id=ids["mask"])
    if ids["vocab"] > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {ids['vocab']:,} ids; model preset {preset} only {cfg.vocab_size:,}")
    masking.check_mask_id(ids["mask"], ids["vocab"], cfg.vocab_size, ids["special"])
    return replace(cfg, mask_id=ids["mask"])


# ----------------------------------------------------------------------------- model

def build(model_cfg, cfg, device, compile_model, ac):
    """The model on `meta` (no memory), activation checkpointing by policy and torch.compile per
    block (model.apply_ac), FSDP2 units as torchtitan shards them, materialised on `device` and
    initialised shard by shard (no rank ever holds the whole model); and its fused AdamW."""
    with torch.device("meta"):
        m = model_lib.Transformer(model_cfg)
    model_lib.apply_ac(m, ac, compile_blocks=compile_model)
    model_lib.apply_fsdp(m, mixed_precision=device.startswith("cuda"))
    m.to_empty(device=device)
    m.init_weights(seed=cfg.seed)
    opt = m.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), device.split(":")[0], fused=True)
    return m, opt


def loss_ce(compile_model):
    """Per-token CE of the loss: compiled, the fp32 upcast fuses into the softmax, so the
    (masked tokens x 126,464) logits never exist in fp32."""
    return torch.compile(masking.token_ce, dynamic=True) if compile_model else masking.token_ce


# ----------------------------------------------------------------------------- the loop

def lr_at(step, cfg):
    """Linear warm-up, then wsd (constant, then linear decay to min_lr over the last decay_frac of
    the steps; LLaDA's shape), cosine to min_lr, or constant."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        frac = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)
    decay_start = cfg.max_steps - int(cfg.decay_frac * cfg.max_steps)
    if step < decay_start:
        return cfg.lr
    frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return cfg.lr + frac * (cfg.min_lr - cfg.lr)


def md_micro_loss(model, x0, mask_id, cfg, gen, ce_fn, maskable=None):
    """One draw of the MD objective on a micro-batch: t ~ U[t0, t1], the masks, the loss with the
    head at masked positions only. maskable: SFT's answer positions. Returns (loss, masked)."""
    t = masking.sample_t(len(x0), cfg.t0, cfg.t1, generator=gen, device=x0.device)          # Def. 3.4
    xt, masked = masking.mask_tokens(x0, t, mask_id, maskable=maskable, generator=gen)
    logits = model(xt, output_mask=masked)
    return masking.md_loss(logits, x0, masked, t, maskable=maskable, ce_fn=ce_fn), masked       # Eq. (1)


@torch.no_grad()
def heldout_nll(model, seqs, cfg, device, maskable=None):
    """Fig. 4's held-out NLL: masking's full-range bound, t over all of [0, 1]. Chunk c of
    eval_batch sequences is scored by rank c % world with a generator seeded by c, so the masks
    are the same for every run and world size; ranks short of a chunk run a dummy forward (FSDP
    needs every rank in every forward)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    chunks = list(seqs.split(cfg.eval_batch))
    masks = list(maskable.split(cfg.eval_batch)) if maskable is not None else [None] * len(chunks)
    total = torch.zeros(2, device=device)            # summed nll, number of draws
    for c in range(rank, math.ceil(len(chunks) / world) * world, world):
        real = c < len(chunks)
        part, valid = chunks[c if real else 0].to(device), masks[c if real else 0]
        g = torch.Generator(device).manual_seed(1234 + c)
        with eager_unless(len(part) * cfg.eval_draws % cfg.micro_batch == 0):    # a ragged chunk: no new graph
            _, nll = masking.elbo_terms(lambda xt: model(xt, output_mask=xt == model.cfg.mask_id), part,
                                        model.cfg.mask_id, n_t=cfg.eval_draws, generator=g, chunk=cfg.micro_batch,
                                        maskable=None if valid is None else valid.to(device))
        if real:
            total += torch.stack([nll.float().sum(), torch.tensor(float(len(nll)), device=device)])
    dist.all_reduce(total)
    if hasattr(model, "reshard"):
        model.reshard()      # FSDP2 keeps the root gathered after a forward without backward
    model.train()
    return (total[0] / total[1]).item()


class Logger:
    """Rank 0 prints each record and appends it to OUT_DIR/log.jsonl; other ranks are silent."""

    def __init__(self, out_dir, active):
        self.path = os.path.join(out_dir, "log.jsonl") if active else None

    def __call__(self, text, **record):
        if self.path:
            print(text, flush=True)
            if record:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")


def check_config(cfg, world):
    """User errors that every rank finds alike, before any work (pre-training's and SFT's settings)."""
    common.check_positive(batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, block_size=cfg.block_size,
                          gpu_gib=cfg.gpu_gib)
    masking.check_interval(cfg.t0, cfg.t1)
    if cfg.batch_size % (cfg.micro_batch * world):
        raise ValueError(f"the global batch of {cfg.batch_size} sequences is not a multiple of micro-batch "
                         f"{cfg.micro_batch} x {world} processes; change --batch-size or --micro-batch")
    if cfg.schedule not in ("wsd", "cosine", "constant"):
        raise ValueError(f"--schedule must be wsd, cosine or constant, got {cfg.schedule!r}")
    positive = ("max_steps", "eval_every", "save_every", "log_every", "eval_seqs", "eval_docs", "eval_rows",
                "eval_draws", "eval_batch", "keep")
    common.check_positive(**{name: getattr(cfg, name) for name in positive if hasattr(cfg, name)})
    if cfg.ac != "auto":
        model_lib.ac_modes(cfg.ac, 1)
    if cfg.export_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--export-dtype must be float32 or bfloat16, got {cfg.export_dtype!r}")
    common.check_optimizer(cfg)


BOOKKEEPING = ("log_every", "save_every", "keep", "export_dtype", "ac", "gpu_gib", "last_save_model_only")


def prepare_run(out_dir, export_dir, resume, rank, device):
    """Before any work, on rank 0, agreed by all: a fresh run never touches an earlier one's
    --out-dir, the export path is a folder (or new), and the out-dir is writable."""
    def check():
        if rank != 0:
            return
        common.check_fresh(out_dir, resume)
        if export_dir and os.path.exists(export_dir) and not os.path.isdir(export_dir):
            raise ValueError(f"--export {export_dir} exists and is not a folder")
        if export_dir and os.path.isdir(export_dir) and os.listdir(export_dir) and not resume:
            raise ValueError(f"--export {export_dir} holds an earlier export; choose another --export")
        if resume and not checkpoints(out_dir):          # said, so that a mistyped --out-dir shows
            print(f"--resume: no checkpoint in {out_dir} yet; starting a fresh run", flush=True)
        common.prepare_out_dir(out_dir)
    on_every_rank(check, device)


def resume_from(latest, model, opt, slots, n_slots, device, cfg, allow_change=()):
    """Model, optimizer and every slot's state from the newest complete checkpoint (if any), after
    checking that it was written with this run's settings; returns (step, history, seconds
    trained so far, the settings changed knowingly with --allow-change) as the `run` dict the loop
    carries."""
    if latest is None:
        return dict(step=0, history=[], seconds=0.0, changes={})
    extra = on_every_rank(read_extra, device, latest)
    if extra.get("model_only"):
        agree(f"checkpoint {latest} holds the model only (the last save of a finished run, --last-save-model-only): "
              f"export or evaluate it; it cannot be resumed")
    changes = on_every_rank(lambda: {**extra.get("changes", {}), **common.check_resume_settings(
        extra["config"], asdict(cfg), latest, allow_change, ignore=BOOKKEEPING)}, device)
    load_checkpoint(latest, model, opt, device)
    if len(extra["slots"]) != n_slots:
        raise ValueError(f"checkpoint {latest} has {len(extra['slots'])} data slots, this run {n_slots} "
                         f"(batch / micro-batch); resume with the same --batch-size and --micro-batch")
    for i, slot in slots.items():
        slot.load_state_dict(extra["slots"][i])
    return dict(step=extra["step"], history=extra["history"], seconds=extra["seconds"], changes=changes)


def resumed(latest, run):
    changed = f" with settings changed knowingly: {run['changes']}" if run["changes"] else ""
    return f"resumed {latest} at step {run['step']}{changed}"


class Prefetch:
    """The next step's micro-batches drawn on a background thread while this step computes, so
    that streaming and tokenising overlap the GPU. Each batch comes with the slots' data position
    after it (a checkpoint saves that one, not the position after the batch drawn ahead). No
    collective runs on the thread: a user error travels with the batch to the main thread."""

    def __init__(self, batches, slots, start, stop):
        import queue
        import threading
        self.queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self.fill, args=(batches, slots, start, stop), daemon=True)
        self.thread.start()

    def fill(self, batches, slots, start, stop):
        try:
            for step in range(start, stop):
                self.queue.put((batches(step), {i: s.data_state() for i, s in slots.items()}, None))
        except Exception as e:       # to the main thread (which would otherwise wait for ever)
            self.queue.put((None, None, e))

    def next(self):
        micro, states, error = self.queue.get()
        agree(str(error) if isinstance(error, (ValueError, OSError)) else None)     # a user error, on every rank
        if error is not None:
            raise error              # a bug: its traceback
        return micro, states


def train_loop(cfg, model, opt, slots, batches, evaluate, out_dir, device, ce_fn, log, run):
    """The loop pre-training and SFT share. batches(step) gives this rank's micro-batches, one
    (x0, maskable) per slot in slot order; each is masked with its slot's generator. Every
    eval_every steps evaluate() gives the held-out NLL; every save_every steps a checkpoint
    holds the model, optimizer and every slot's state. `run` (step, history, seconds, changes; from
    resume_from) is carried on and returned.

    No host sync in a step: loss, masked share and non-finite steps add up on the GPU and are read
    back, with the ranks' sequence lengths compared, only on check steps (log, eval, save, last).
    A step whose gradient norm is not finite leaves the weights as they were (the fused AdamW
    skips it on the GPU, as under a GradScaler); the next check step stops the run, before any
    checkpoint could hold it."""
    step, history, seconds = run["step"], run["history"], run["seconds"]
    world, cuda = dist.get_world_size(), device.startswith("cuda")
    peak = model_lib.device_peak_flops(device)
    progress, t_log = common.Progress(cfg.max_steps, start=step), time.time()
    sums, lengths = torch.zeros(3, device=device), []          # loss, masked share, skipped steps
    feed = Prefetch(batches, slots, step, cfg.max_steps)
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        micro, data_states = feed.next()
        L = micro[0][0].shape[1]
        with eager_unless(L == cfg.block_size):
            for i, (x0, maskable) in zip(sorted(slots), micro):
                maskable = None if maskable is None else maskable.to(device, non_blocking=True)
                loss, masked = md_micro_loss(model, x0.to(device, non_blocking=True), model.cfg.mask_id, cfg,
                                             slots[i].gen, ce_fn, maskable)
                (loss / len(micro)).backward()
                sums[:2] += torch.stack([loss.detach(), masked.float().mean()]) / len(micro)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        opt.found_inf = (~torch.isfinite(norm)).float()          # fused AdamW: skip the step, on the GPU
        sums[2] += opt.found_inf
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lengths.append(L)
        last = step == cfg.max_steps
        if not (last or step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step % cfg.save_every == 0):
            continue
        totals = sums.clone()
        dist.all_reduce(totals)
        loss_val, frac, skipped = (totals / torch.tensor([world * len(lengths)] * 2 + [world], device=device)).tolist()
        check_lengths(lengths, step)
        if skipped or not math.isfinite(loss_val):
            raise ValueError(f"the training loss became {loss_val} by step {step}; stopped (the non-finite step "
                             f"did not reach the weights). The last complete checkpoint is "
                             f"{(checkpoints(out_dir) or ['none'])[-1]}")
        if last or step % cfg.log_every == 0:
            dt = time.time() - t_log
            tok_s = cfg.batch_size * sum(lengths) / dt
            mfu = model_lib.estimate_mfu(model.flops_per_token(cfg.block_size, frac), tok_s / world, peak)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            grad_norm = norm.item()
            rec = dict(step=step, loss=loss_val, lr=lr, grad_norm=grad_norm, seq_len=lengths[-1], tokens_per_sec=tok_s,
                       tokens_per_sec_per_gpu=tok_s / world, mfu=mfu, peak_mem_gib=mem,
                       seconds=seconds + progress.elapsed())
            log(f"step {step:6d} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm {grad_norm:.2f} | "
                f"{tok_s:,.0f} tok/s ({tok_s / world:,.0f}/GPU)" + (f" | MFU {100 * mfu:.1f}%" if mfu else "")
                + (f" | peak mem {mem:.1f} GiB" if mem else "") + f" | {progress.eta(step)}", **rec)
            history.append(rec)
            sums.zero_()
            t_log, lengths = time.time(), []
        if last or step % cfg.eval_every == 0:
            nll = evaluate()
            history.append(dict(step=step, test_loss=nll))
            log(f"step {step:6d} | held-out NLL {nll:.4f} (full-range bound, nats/token)", step=step, test_loss=nll)
        if last or step % cfg.save_every == 0:
            mine = {i: {**data_states[i], "gen": slots[i].gen.get_state()} for i in slots}
            states = [None] * world
            dist.all_gather_object(states, mine, group=CONTROL)
            extra = dict(step=step, slots={i: s for d in states for i, s in d.items()}, history=history,
                         config=asdict(cfg), seconds=seconds + progress.elapsed(), changes=run["changes"])
            save_checkpoint(out_dir, step, model, opt, extra, cfg.keep, model_only=last and cfg.last_save_model_only)
    wait_for_save()
    return dict(run, step=step, history=history, seconds=seconds + progress.elapsed())


def eager_unless(full_shape):
    """LLaDA's random-length steps (1%) and ragged evaluation chunks run eagerly: the compiled blocks
    keep one static graph for the full (micro-batch, block) shape instead of recompiling, or going
    dynamic, for every shape drawn."""
    import contextlib
    return contextlib.nullcontext() if full_shape else torch.compiler.set_stance("force_eager")


def check_lengths(lengths, step):
    """LLaDA's random lengths are drawn from the step alone, so every rank crops alike; a rank that
    did not is a bug, found by comparing the lengths since the last check (CPU, over gloo)."""
    mine = torch.tensor([sum(lengths), -sum(lengths)], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=CONTROL)
    if mine.sum().item() != 0:
        raise RuntimeError(f"ranks trained the steps up to {step} on different lengths")


def finish(cfg, model, out_dir, export_dir, tok, ids, run, plot, **notes):
    """Export, summary.json (and the held-out NLL curve); returns the summary on rank 0. `notes`
    (skipped rows, ...) and the settings changed on resume go into the summary beside the results."""
    export(model, export_dir or os.path.join(out_dir, "export"), tok, ids, cfg.export_dtype)
    summary = summarize(cfg, run["history"], model, dist.get_world_size(), run["seconds"])
    summary.update(notes, **({"changed_on_resume": run["changes"]} if run["changes"] else {}))
    if dist.get_rank() != 0:
        return None
    common.write_json(os.path.join(out_dir, "summary.json"), summary)
    if plot:
        plot_runs([out_dir], os.path.join(out_dir, "heldout_nll.png"))
    return summary


def describe(cfg):
    return f"MD U[{cfg.t0:g}, {cfg.t1:g}]"


def summarize(cfg, history, model, world, seconds):
    evals = [h for h in history if "test_loss" in h]
    trains = [h for h in history if "loss" in h]
    last = evals[-1] if evals else {"step": 0, "test_loss": None}
    return dict(settings=asdict(cfg), parameters=model.num_params(), world_size=world, steps=last["step"],
                tokens=last["step"] * cfg.batch_size * cfg.block_size, seconds=round(seconds, 1),
                test_loss=last["test_loss"], train_loss=trains[-1]["loss"] if trains else None,
                test_loss_curve=[(h["step"], h["test_loss"]) for h in evals])


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(out_dir):
    """Complete checkpoints, oldest first: step_NNNNNNN folders (written as .tmp, renamed when whole)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(os.path.join(out_dir, d) for d in names if d.startswith("step_") and not d.endswith(".tmp"))


PENDING = []     # the checkpoint being written: (future, tmp folder, final folder, out_dir, keep, extra)


def save_checkpoint(out_dir, step, model, opt, extra, keep, model_only=False):
    """Sharded (torch.distributed.checkpoint: every rank writes its part) model and optimizer, plus
    rank 0's extra.pt (step, data positions and generators of every slot, history, settings).
    Written asynchronously (dcp.async_save: the state is staged to host memory, training goes on
    while it is written), as step_N.tmp, renamed whole by wait_for_save (at the next save, or the
    end). model_only: the last save of a run may drop the optimizer state (two thirds of the
    bytes); such a checkpoint exports and evaluates, it does not resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    wait_for_save()
    final = os.path.join(out_dir, f"step_{step:07d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)                   # the leftovers of a run killed while saving
    dist.barrier(group=SAVING)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd} if model_only else {"model": msd, "optim": osd}
    future = dcp.async_save(state, checkpoint_id=tmp, process_group=SAVING)
    PENDING.append((future, tmp, final, out_dir, keep, dict(extra, model_only=model_only)))


def wait_for_save():
    """Finish the checkpoint in flight: every rank's part written, then extra.pt, then the rename
    that makes it complete, then the oldest beyond --keep removed (this run's own: a fresh run
    never starts in a folder holding another's)."""
    while PENDING:
        future, tmp, final, out_dir, keep, extra = PENDING.pop()
        future.result()
        dist.barrier(group=SAVING)
        if dist.get_rank() == 0:
            torch.save(extra, os.path.join(tmp, "extra.pt"))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old)
        dist.barrier(group=SAVING)


def read_extra(path):
    """A checkpoint folder's extra.pt, checked before any collective: a half-written or corrupt
    checkpoint is a user error (delete it or start over)."""
    import torch.distributed.checkpoint as dcp
    try:
        dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: truncated or corrupt); "
                         f"delete it, or start without --resume") from None
    return common.load_checkpoint(os.path.join(path, "extra.pt"))


def load_checkpoint(path, model, opt, device):
    """Model and optimizer shards of `path` into the (FSDP) model and optimizer; returns extra."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    extra = on_every_rank(read_extra, device, path)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}

    def load():
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, dist.checkpoint.api.CheckpointException) as e:   # the latter is a BaseException
            raise ValueError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: corrupt, or written by other "
                             f"settings); delete it, or resume with the settings it was written with") from None
    on_every_rank(load, device)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return extra


def export(model, folder, tok, ids, dtype):
    """One consolidated LLaDA-format folder: safetensors shards, config.json (LLaDA's key names)
    and tokenizer.json, all the next step (sft_8b.py, eval_8b.py) needs. One parameter at a time is
    cast to the export dtype on its shards (half the bytes to move, in bf16), gathered, and kept
    on rank 0's CPU alone; the GPUs never hold the model whole. The other ranks are done after the
    last gather: none waits in a collective while rank 0 writes 16 GB."""
    dtype_ = getattr(torch, dtype)
    state = {}
    for name, p in model.state_dict().items():
        full = p.to(dtype_)
        full = full.full_tensor() if hasattr(full, "full_tensor") else full
        if dist.get_rank() == 0:
            state[name] = full.cpu()
        del full
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        model_lib.save_safetensors(state, folder, dtype=dtype_)
        config = model_lib.config_to_json(model.cfg, eos_token_id=ids["eos"], pad_token_id=ids["eos"],
                                          bos_token_id=ids["bos"], torch_dtype=dtype)
        common.write_json(os.path.join(folder, "config.json"), config)
        tok.save(os.path.join(folder, "tokenizer.json"))


# ----------------------------------------------------------------------------- Fig. 4

def plot_runs(run_dirs, path):
    """Fig. 4: the held-out NLL of several runs against the step, one curve per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in run_dirs:
        summary = os.path.join(d, "summary.json")
        if not os.path.exists(summary):
            raise FileNotFoundError(f"--plot-runs: {summary} does not exist (is {d} a finished run?)")
        with open(summary) as f:
            s = json.load(f)
        if not s["test_loss_curve"]:
            raise ValueError(f"--plot-runs: {d} has no held-out evaluation")
        steps, nll = zip(*s["test_loss_curve"])
        ax.plot(steps, nll, "o-", ms=3, label=f"U[{s['settings']['t0']:g}, {s['settings']['t1']:g}] ({d})")
    ax.set(xlabel="step", ylabel="held-out NLL (full-range bound, nats/token)", title="Fig. 4: pre-training test loss")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def plot_runs_cli(a):
    """--plot-runs: the held-out NLL curves of the named runs on one figure in OUT_DIR (Fig. 4)."""
    common.prepare_out_dir(a.out_dir)
    path = os.path.join(a.out_dir, a.runs_figure)
    plot_runs(a.plot_runs, path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- planning and speed

def plan_model(cfg):
    """The configured model on `meta` (no memory), vocabulary sized as a run would size it."""
    mc = model_lib.get_config(cfg.model, block_size=cfg.block_size)
    if not cfg.model.startswith("llada"):
        mc = replace(mc, vocab_size=256 + len(SPECIALS), mask_id=257)
    with torch.device("meta"):
        return model_lib.Transformer(mc)


def memory_gib(cfg, world, m):
    """Peak GiB per GPU by part, in total per activation-checkpointing policy (an upper bound:
    the parts' peaks are added although not all coincide), and the evaluation's. Bytes per token and block kept for
    backward: ~2(14d + 4h) without checkpointing (bf16 tensors, fp32 norm copies, flash attention
    keeps no L x L scores); 2(7d + 2h) selective (matmul and attention outputs, the block input);
    2d full (the block input) plus one block recomputed at a time."""
    mc, gib = m.cfg, 2.0 ** 30
    n, d, h, V, nl = m.num_params(), mc.d_model, mc.mlp_hidden, mc.vocab_size, mc.n_layer
    tok = cfg.micro_batch * cfg.block_size
    head = V * d * (1 if mc.tie_weights else 2)             # embedding + head parameters
    block = 4 * d * d + 3 * d * h + 2 * d
    parts = dict(params=4 * n / world, grads=4 * n / world, adam=8 * n / world,
                 gathered=2 * (head + 2 * block),           # bf16: embedding, head kept gathered, 2 blocks in flight
                 reduce_buffers=6 * (head / 2 + 2 * block), # bf16 unsharded grads + fp32 reduce-scatter input
                 logits_t1=12 * tok * V,                    # worst t: bf16 logits, fp32 upcast, fp32 + bf16 grads
                 overhead=3 * gib)                          # CUDA context, NCCL buffers, fragmentation (allowance)
    none = 2 * (14 * d + 4 * h) * tok
    acts = {"none": nl * none, "selective": nl * 2 * (7 * d + 2 * h) * tok,
            "every-2": (nl // 2) * none + (nl - nl // 2) * 2 * d * tok + none, "full": nl * 2 * d * tok + none}
    fixed = sum(parts.values())
    # the held-out NLL: no gradients, micro-batch chunks of t up to 1 (bf16 logits and their fp32 CE)
    evaluation = fixed - parts["grads"] - parts["reduce_buffers"] - parts["logits_t1"] + 6 * tok * V + none
    return {k: v / gib for k, v in parts.items()}, {k: (fixed + a) / gib for k, a in acts.items()}, evaluation / gib


def choose_ac(cfg, world, device):
    """--ac auto: on a GPU, the cheapest policy in recomputation that fits 90% of --gpu-gib
    (none, then selective, then full); on a CPU, none."""
    if cfg.ac != "auto":
        return cfg.ac
    if not device.startswith("cuda"):
        return "none"
    return fitting_policy(memory_gib(cfg, world, plan_model(cfg))[1], cfg.gpu_gib)


def fitting_policy(totals, gpu_gib):
    return next((p for p in ("none", "selective", "full") if totals[p] < 0.9 * gpu_gib), "full")


def plan(cfg, world, mfu, peak=989e12, paper_hours=None):
    """--dry-run: parameters, FLOPs, memory per GPU under each checkpointing policy on `world` GPUs
    of cfg.gpu_gib, and time at `mfu` of `peak` (H100 SXM: 989 TFLOP/s dense bf16). Returns the
    numbers it prints."""
    m = plan_model(cfg)
    n, V, d = m.num_params(), m.cfg.vocab_size, m.cfg.d_model
    head_frac = (cfg.t0 + cfg.t1) / 2                      # E[t]: share of positions that run the head
    fpt = m.flops_per_token(cfg.block_size, head_frac)
    tokens_step = cfg.batch_size * cfg.block_size
    parts, totals, evaluation = memory_gib(cfg, world, m)
    auto = fitting_policy(totals, cfg.gpu_gib)
    step_s = fpt * tokens_step / (world * peak * mfu)
    out = dict(parameters=n, flops_per_token=fpt, flops_per_step=fpt * tokens_step, step_seconds=step_s,
               total_hours=step_s * cfg.max_steps / 3600, gib=parts, total_gib=totals, ac_auto=auto,
               evaluation_gib=evaluation)
    accum = cfg.batch_size / (cfg.micro_batch * world)
    print(f"{cfg.model}: {n:,} parameters ({n - V * d * (1 if m.cfg.tie_weights else 2):,} outside the embedding "
          f"and head), block {cfg.block_size}, vocabulary {V:,}")
    print(f"FLOPs per token (6N + attention, head on the masked share E[t] = {head_frac:g}): {fpt / 1e9:.2f} G; "
          f"per step of {cfg.batch_size} x {cfg.block_size} = {tokens_step:,} tokens: {fpt * tokens_step:.3e}")
    print(f"per GPU, {world} GPUs, micro-batch {cfg.micro_batch} ({accum:g} accumulation steps), FSDP2 "
          f"(fp32 master, bf16 compute), GiB:")
    for k, v in parts.items():
        print(f"  {k:<28} {v:8.2f}")
    for policy, total in totals.items():
        print(f"  total, --ac {policy:<10} {total:8.1f} of {cfg.gpu_gib:g} GiB "
              f"({'fits' if total < 0.9 * cfg.gpu_gib else 'does NOT fit'} in 90%)")
    print(f"  held-out evaluation (no gradients, chunks of {cfg.micro_batch} sequences) {evaluation:8.1f}")
    print(f"--ac auto picks {auto} (recomputation: selective repeats the elementwise ops, full a whole forward of "
          f"each block, ~25% of the step)")
    print(f"time at {100 * mfu:.0f}% MFU of {peak / 1e12:.0f} TFLOP/s per GPU: {step_s:.2f} s a step, "
          f"{out['total_hours']:.1f} h for {cfg.max_steps:,} steps ({cfg.max_steps * tokens_step / 1e9:.2f} B tokens)")
    if paper_hours:
        implied = fpt * tokens_step * cfg.max_steps / (paper_hours * 3600 * world * peak)
        out["paper_hours_mfu"] = implied
        print(f"the paper's 'about {paper_hours} hours' for {cfg.max_steps:,} steps on {world} H100s implies "
              f"{100 * implied:.0f}% MFU")
    return out


def benchmark(cfg, device, compile_model, layers, steps=10, warmup=2):
    """Optimizer steps as the full run takes them (its gradient accumulation: batch_size /
    (micro_batch x GPUs) micro-batches a step) on the preset's full-width blocks (`layers` of them,
    with the embedding and head), FSDP2 over the GPUs present, random tokens, t ~ U[t0, t1]; tokens/s
    per GPU, MFU and peak memory (rank 0 prints). With fewer blocks than the model the head's share
    of the FLOPs is larger than in the full run: it is printed beside the result."""
    rank, world, device = setup_distributed(device)
    check_config(cfg, world)
    full = plan_model(cfg)
    mc = replace(full.cfg, n_layer=min(layers or full.cfg.n_layer, full.cfg.n_layer))     # never more than the model
    ac = choose_ac(cfg, world, device)
    model, opt = build(mc, cfg, device, compile_model, ac)
    ce_fn, gen = loss_ce(compile_model), torch.Generator(device).manual_seed(rank)
    accum = cfg.batch_size // (cfg.micro_batch * world)

    def one_step():
        frac = torch.zeros((), device=device)
        for _ in range(accum):
            x0 = torch.randint(0, mc.mask_id, (cfg.micro_batch, cfg.block_size), generator=gen, device=device)
            loss, masked = md_micro_loss(model, x0, mc.mask_id, cfg, gen, ce_fn)
            (loss / accum).backward()
            frac += masked.float().mean() / accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return frac
    seconds, fracs = common.time_steps(one_step, steps, warmup, device)
    frac, cuda = fracs.mean().item(), device.startswith("cuda")
    tok_s = steps * accum * cfg.micro_batch * cfg.block_size / seconds      # per GPU
    fpt = model.flops_per_token(cfg.block_size, frac)
    head = lambda m: 6 * m.cfg.vocab_size * m.cfg.d_model * frac / m.flops_per_token(cfg.block_size, frac)
    mfu = model_lib.estimate_mfu(fpt, tok_s, model_lib.device_peak_flops(device))
    out = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=world, model=cfg.model,
               n_layer=mc.n_layer, d_model=mc.d_model, block_size=cfg.block_size, micro_batch=cfg.micro_batch,
               accumulation=accum, ac=ac, compile=compile_model, tokens_per_sec_per_gpu=tok_s, mfu=mfu,
               head_share=head(model), head_share_full_model=head(full),
               peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None)
    if rank == 0:
        print(f"{mc.n_layer} of {full.cfg.n_layer} blocks (d_model {mc.d_model}) + head, {accum} x {cfg.micro_batch} "
              f"x {cfg.block_size} tokens per GPU per step, {world} GPU(s), --ac {ac}, compile "
              f"{'on' if compile_model else 'off'}: {tok_s:,.0f} tokens/s per GPU" +
              (f", MFU {100 * mfu:.1f}%" if mfu else "") +
              (f", peak memory {out['peak_memory_gib']:.1f} GiB" if cuda else "") +
              f"; the head is {100 * out['head_share']:.0f}% of these FLOPs, {100 * out['head_share_full_model']:.0f}% "
              f"of the full model's", flush=True)
    return out


# ----------------------------------------------------------------------------- command line

def add_run_args(p, cls, figure, **defaults):
    """The command line pretrain_8b.py and sft_8b.py share: the common vocabulary (`defaults`: presets,
    preset, t0, t1, out_dir), one flag per field of their config dataclass `cls`, and the flags below.
    `figure`: the file --plot-runs writes."""
    common.add_common_args(p, **defaults, resume_help="continue from the newest complete checkpoint in OUT_DIR "
                                                      "(none yet: a fresh run)",
                           dry_run_help="print the plan (parameters, FLOPs, memory per GPU, time) and exit")
    preset = defaults["preset"]
    common.add_config_args(p, cls, defaults["presets"][preset], f"{preset} preset")
    p.set_defaults(runs_figure=figure)
    p.add_argument("--export", default=None, metavar="DIR",
                   help="write the LLaDA-format export here at the end of the run (default OUT_DIR/export)")
    p.add_argument("--plot-runs", nargs="+", default=None, metavar="RUN_DIR",
                   help=f"draw the held-out NLL of finished runs into OUT_DIR/{figure}")
    p.add_argument("--world-size", type=int, default=None, help="--dry-run: GPUs to plan for (default: the "
                                                                "launcher's, else 8)")
    p.add_argument("--plan-mfu", type=float, default=0.40, help="--dry-run: MFU to time the run at (%(default)s)")
