"""
The machinery the LLaDA-8B scripts share (pretrain_8b.py, sft_8b.py, eval_8b.py), in torchtitan's
shape without its framework: one small function per concern.

    setup -> tokenizer -> parallelize (activation checkpointing, compile, FSDP2 units, sharded init)
    -> the training loop over data slots -> DCP checkpoints and resume -> LLaDA-format export,
    and Fig. 4's plot. The --dry-run plan, its memory trace and --benchmark are plan.py's.

No science lives here: the loss and masks are masking.py's, the network model.py's. Every rank runs
the same code; rank 0 alone prints, decides and writes shared files; a failure is agreed on by every
rank (common.on_every_rank) so that all of them exit together.

Surviving a lost worker: launch with torchrun --max-restarts N and always pass --resume. A
checkpoint is complete (step_N.tmp renamed to step_N) as soon as every rank's part is written, so a
restart loses at most the steps since the last save; collectives time out after --dist-timeout, so a
rank that is gone becomes an error torchrun restarts from, not a hang.
"""
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, replace
from datetime import timedelta

import torch
import torch.distributed as dist

import common
import masking
import model as model_lib

LLADA = "GSAI-ML/LLaDA-8B-Base"
SLOT_SEED_STRIDE = 1_000_003    # slot i of a run seeded s draws its masks from generator s * stride + i
EVAL_SEED = 1234                # held-out chunk c is masked by generator EVAL_SEED + c in every run


# ----------------------------------------------------------------------------- distributed setup

SAVING = None     # the gloo group DCP's async saves run on: theirs alone, so no other collective interleaves


def setup(device, timeout_s=600.0):
    """common.setup_distributed, plus the group checkpoints are written over. Returns (rank, world, device)."""
    global SAVING
    rank, world, device = common.setup_distributed(device, timeout_s)
    SAVING = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return rank, world, device


def teardown():
    global SAVING, STAGER
    if STAGER is not None:
        STAGER.close()
    SAVING = STAGER = None
    PENDING.clear()
    common.release_locks()
    common.teardown()


def check_shared(out_dir):
    """Every rank must see --out-dir (on several nodes: one shared file system), or each node would
    write checkpoints of its own that no restart could assemble: rank 0 writes a probe file, every
    rank looks for it."""
    if dist.get_world_size() == 1:
        return
    name = common.broadcast(f".probe-{uuid.uuid4().hex}")
    path = os.path.join(out_dir, name)
    common.on_every_rank(lambda: open(path, "w").close() if dist.get_rank() == 0 else None)

    def look():
        if not os.path.exists(path):
            raise common.UserError(f"--out-dir {out_dir} is not seen by every rank (rank {dist.get_rank()} on "
                                   f"{os.uname().nodename} does not find {name} that rank 0 wrote): put it on a file "
                                   f"system every node shares")
    try:
        common.on_every_rank(look)
    finally:
        if dist.get_rank() == 0 and os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------- tokenizer

CHAT_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIALS = ["<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>", *CHAT_MARKERS]    # LLaDA's EOS, MASK, BOS, chat
# LLaDA-8B-Base's tokenizer_config.json lists added tokens up to 126345 and no chat markers; LLaDA-8B-
# Instruct's sampler ends a turn at <|eot_id|> = 126348. Added in the template's order after 126345, the
# three markers get 126346, 126347 and 126348: the last is the id LLaDA's generate.py uses.
LLADA_EOT = 126348


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
        raise common.UserError(f"tokenizer {path} does not exist")
    try:
        return Tokenizer.from_file(path) if local else Tokenizer.from_pretrained(name)
    except Exception as e:      # offline, unknown Hub id, not a tokenizer.json
        raise common.UserError(f"could not load tokenizer {name!r} ({type(e).__name__}); pass --tokenizer with a "
                               f"local tokenizer.json, or '' for bytes") from None


def token_ids(tok, model_cfg=None):
    """EOS, MASK (and BOS when there is one) of a tokenizer, its vocabulary size (one past the
    largest id) and its special ids (which text never encodes to)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = dict(eos=tok.token_to_id("<|endoftext|>"), mask=tok.token_to_id("<|mdm_mask|>"),
               bos=tok.token_to_id("<|startoftext|>"), vocab=max(vocab.values()) + 1,
               special={i for i, t in tok.get_added_tokens_decoder().items() if t.special})
    if ids["eos"] is None:
        raise common.UserError("the tokenizer has no <|endoftext|> token to end documents with")
    if ids["mask"] is None:
        if model_cfg is None:
            raise common.UserError("the tokenizer has no <|mdm_mask|> token: add it as a special token (an id no "
                                   "text encodes to)")
        ids["mask"] = model_cfg.mask_id
    return ids


def chat_tokens(tok):
    """LLaDA's chat template needs <|start_header_id|>, <|end_header_id|> and <|eot_id|> as single
    tokens. LLaDA-8B-Base's tokenizer may lack them: in its layout (nothing past 126345) they are
    added with the ids LLaDA-8B-Instruct uses; any other tokenizer without them is refused, naming
    what is missing. Returns {marker: id}."""
    from tokenizers import AddedToken
    missing = [m for m in CHAT_MARKERS if tok.token_to_id(m) is None]
    next_id = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    if len(missing) == len(CHAT_MARKERS) and next_id == LLADA_EOT - len(CHAT_MARKERS) + 1:
        tok.add_special_tokens([AddedToken(m, special=True) for m in CHAT_MARKERS])
        if tok.token_to_id("<|eot_id|>") != LLADA_EOT:
            raise RuntimeError("the chat markers were added with other ids than LLaDA-Instruct's")
        missing = []
    split = [m for m in CHAT_MARKERS if m not in missing and tok.encode(m, add_special_tokens=False).ids !=
             [tok.token_to_id(m)]]
    if missing or split:
        raise common.UserError("the tokenizer cannot write LLaDA's chat template: " + "; ".join(
            part for part in (f"no {', '.join(missing)} token" if missing else "",
                              f"{', '.join(split)} not encoded as one token" if split else "") if part)
                               + " (pass --tokenizer with LLaDA-8B-Instruct's tokenizer.json)")
    return {m: tok.token_to_id(m) for m in CHAT_MARKERS}


def model_config(preset, ids, **overrides):
    """The model preset, its vocabulary sized from the tokenizer where the preset is not LLaDA's
    (LLaDA keeps its padded 126,464), checked: every id fits, MASK is no real token."""
    with common.user_input():
        cfg = model_lib.get_config(preset, **overrides)
        if not preset.startswith("llada"):
            cfg = replace(cfg, vocab_size=ids["vocab"], mask_id=ids["mask"])
        if ids["vocab"] > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {ids['vocab']:,} ids; model preset {preset} only {cfg.vocab_size:,}")
        masking.check_mask_id(ids["mask"], ids["vocab"], cfg.vocab_size, ids["special"])
        return replace(cfg, mask_id=ids["mask"])


def read_model_config(folder, flag):
    """The ModelConfig of a LLaDA-format folder's config.json, every field checked: one line naming the
    file for anything that is not a model's config."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise common.UserError(f"{flag} {folder}: no config.json")
    try:
        return model_lib.config_from_json(common.read_json(path, f"{flag}'s"))
    except common.UserError:
        raise
    except ValueError as e:
        raise common.UserError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- parallelize (torchtitan)

AC_POLICIES = ("none", "full", "selective", "every-N")


def ac_modes(policy, n_layer):
    """Per block: None (keep every activation), "full" (keep the block's input, recompute the
    block in backward) or "selective" (keep matmul and attention outputs, recompute the cheap
    ops between them). "every-N" is full on blocks 0, N, 2N, ... (torchtitan's policies)."""
    if policy in ("none", "full", "selective"):
        return [None if policy == "none" else policy] * n_layer
    n = policy.removeprefix("every-")
    if not (policy.startswith("every-") and n.isdigit() and int(n) >= 1):
        raise common.UserError(f"--ac must be auto, none, full, selective or every-N (N >= 1), got {policy!r}")
    return ["full" if i % int(n) == 0 else None for i in range(n_layer)]


def _save_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing: what costs FLOPs is kept, the elementwise ops are recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}


def apply_ac(model, policy, compile_blocks=False):
    """Activation checkpointing by policy, then (optionally) torch.compile, block by block, in
    torchtitan's order: the checkpointed forward is what is compiled, so recomputation happens
    inside the compiled region, and FSDP's hooks (on the module call) stay outside it. Names
    of parameters do not change (no wrapper module), so checkpoints and exports are unaffected."""
    from functools import partial
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    for block, mode in zip(model.transformer.blocks, ac_modes(policy, model.cfg.n_layer)):
        forward = block.forward
        if mode is not None:
            context = partial(create_selective_checkpoint_contexts, _save_matmuls) if mode == "selective" else None
            forward = partial(checkpoint, forward, use_reentrant=False,
                              **({"context_fn": context} if context else {}))
        if compile_blocks:
            forward = torch.compile(forward, fullgraph=True)
        block.forward = forward
    return model


def apply_fsdp(model, mixed_precision=True):
    """FSDP2 units as torchtitan shards them: the token embedding, every block, then the final
    norm and head together (kept gathered from forward to backward: they are needed again at
    once), and the root for what is left. mixed_precision: bf16 compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    t = model.transformer
    if not model.cfg.tie_weights:          # a tied head shares the embedding's unit
        fully_shard(t.wte, **kwargs)
    for block in t.blocks:
        fully_shard(block, **kwargs)
    if not model.cfg.tie_weights:
        fully_shard([t.ln_f, t.ff_out], reshard_after_forward=False, **kwargs)
    fully_shard(model, **kwargs)
    return model


def parallelize(model, ac, compile_blocks, mixed_precision):
    """torchtitan's parallelize(): activation checkpointing and compile per block, then the FSDP2
    units. The model itself (model.py) knows nothing of either."""
    apply_ac(model, ac, compile_blocks)
    return apply_fsdp(model, mixed_precision)


def shard_like(full, p):
    """`full` cut the way the (possibly FSDP-sharded DTensor) parameter p is, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(p, DTensor):
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full


@torch.no_grad()
def init_sharded(model, seed):
    """model.py's init on a sharded model: each parameter drawn whole from its own generator
    (model.param_generator), then cut to this rank's shard, so the weights are those of an
    unsharded model with the same seed at any world size; only one parameter is ever held whole
    (DTensor's own random ops give world-size-dependent values on CPU meshes)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        full = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        model.init_param_(name, full, model_lib.param_generator(seed, i, full.device))
        p.copy_(shard_like(full, p))


@torch.no_grad()
def load_sharded(model, path_or_id):
    """A LLaDA-format checkpoint into an FSDP model: every key and shape checked first, then one
    tensor at a time, this rank's shard of it only."""
    index = model_lib.safetensors_index(path_or_id)
    expected = model.state_dict()
    model_lib.check_fit(index, expected, path_or_id)
    for k, p in expected.items():
        p.copy_(shard_like(model_lib.read_tensor(index[k]).to(device=p.device, dtype=p.dtype), p))


def build(model_cfg, cfg, device, compile_model, ac):
    """The model on `meta` (no memory), parallelized, materialised on `device` and initialised shard
    by shard (no rank ever holds the whole model); and its fused AdamW."""
    with torch.device("meta"):
        m = model_lib.Transformer(model_cfg)
    parallelize(m, ac, compile_model, mixed_precision=device.startswith("cuda"))
    m.to_empty(device=device)
    init_sharded(m, cfg.seed)
    opt = m.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), device.split(":")[0], fused=True)
    return m, opt


def loss_ce(compile_model):
    """Per-token CE of the loss: compiled, the fp32 upcast fuses into the softmax, so the
    (masked tokens x 126,464) logits never exist in fp32."""
    return torch.compile(masking.token_ce, dynamic=True) if compile_model else masking.token_ce


# ----------------------------------------------------------------------------- the loop

class Prefetch:
    """The next step's micro-batches drawn on a background thread while this step computes, so
    that streaming and tokenising overlap the GPU. Each batch comes with the slots' data position
    after it (a checkpoint saves that one, not the position after the batch drawn ahead). No
    collective runs on the thread: a failure travels with the batch to the main thread."""

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
        common.agree(None if error is None else common.failure_of(error))
        if error is not None:
            raise error              # a world of one: the thread's exception itself
        return micro, states


def train_loop(cfg, model, opt, slots, batches, evaluate, out_dir, device, ce_fn, log, run):
    """The loop pre-training and SFT share. batches(step) gives this rank's micro-batches, one
    (x0, maskable) per slot in slot order; each is masked with its slot's generator. Every
    eval_every steps evaluate() gives the held-out NLL; every save_every steps a checkpoint
    holds the model, optimizer and every slot's state. `run` (step, history, seconds, tokens,
    changes; from resume_from) is carried on and returned.

    No host sync in a step: loss, masked share and non-finite steps add up on the GPU and are read
    back, with the ranks' sequence lengths compared, only on check steps (log, eval, save, last).
    A step whose gradient norm is not finite leaves the weights as they were (the fused AdamW
    skips it on the GPU, as under a GradScaler); the next check step stops the run, before any
    checkpoint could hold it."""
    step, history, seconds, tokens = run["step"], run["history"], run["seconds"], run["tokens"]
    world = dist.get_world_size()
    progress, t_log = common.Progress(cfg.max_steps, start=step), time.time()
    sums, lengths = torch.zeros(3, device=device), []          # loss, masked share, skipped steps
    feed = Prefetch(batches, slots, step, cfg.max_steps)
    common.LAST_CHECKPOINT_NOTE = lambda: f"the last complete checkpoint is {newest_complete(out_dir)}"
    while step < cfg.max_steps:
        lr = common.lr_at(step, cfg.lr, warmup=cfg.warmup, max_steps=cfg.max_steps, schedule=cfg.schedule,
                          min_lr=cfg.min_lr, decay_frac=cfg.decay_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        micro, data_states = feed.next()
        L = micro[0][0].shape[1]
        norm = accumulate(model, micro, slots, cfg, device, ce_fn, sums)
        wait_for_staging()       # an async checkpoint's copy of the weights is whole before they change
        opt.found_inf = (~torch.isfinite(norm)).float()          # fused AdamW: skip the step, on the GPU
        sums[2] += opt.found_inf
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lengths.append(L)
        tokens += cfg.batch_size * L
        last = step == cfg.max_steps
        if not (last or step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step % cfg.save_every == 0):
            continue
        complete_saves()
        loss_val, frac = check_step(sums, lengths, step, world, out_dir, device)
        if last or step % cfg.log_every == 0:
            history.append(log_step(log, cfg, model, step, lr, norm, loss_val, frac, lengths, t_log, world, device,
                                    seconds + progress.elapsed(), progress))
            sums.zero_()
            t_log, lengths = time.time(), []
        if last or step % cfg.eval_every == 0:
            nll = evaluate()
            history.append(dict(step=step, test_loss=nll))
            log(f"step {step:6d} | held-out NLL {nll:.4f} (full-range bound, nats/token)", step=step, test_loss=nll)
        if last or step % cfg.save_every == 0:
            extra = dict(step=step, slots=gather_slot_states(slots, data_states), history=history, config=asdict(cfg),
                         seconds=seconds + progress.elapsed(), tokens=tokens, changes=run["changes"],
                         data_id=run.get("data_id"))
            save_checkpoint(out_dir, step, model, opt, extra, cfg.keep, device,
                            model_only=last and cfg.last_save_model_only)
    complete_saves(block=True)
    return dict(run, step=step, history=history, seconds=seconds + progress.elapsed(), tokens=tokens)


def accumulate(model, micro, slots, cfg, device, ce_fn, sums):
    """Forward and backward of every micro-batch of a step (each masked by its slot's generator),
    then the gradient clipped to --grad-clip (0: never). Returns the global gradient norm."""
    L = micro[0][0].shape[1]
    with eager_unless(L == cfg.block_size):
        for i, (x0, maskable) in zip(sorted(slots), micro):
            maskable = None if maskable is None else maskable.to(device, non_blocking=True)
            loss, masked = masking.md_step_loss(model, x0.to(device, non_blocking=True), model.cfg.mask_id, cfg.t0,
                                                cfg.t1, generator=slots[i].gen, maskable=maskable, ce_fn=ce_fn)
            (loss / len(micro)).backward()
            sums[:2] += torch.stack([loss.detach(), masked.float().mean()]) / len(micro)
    norm = common.clip_gradients(model.parameters(), cfg.grad_clip)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def check_step(sums, lengths, step, world, out_dir, device):
    """The host-side checks of a check step: the summed loss and masked share over the ranks, the
    ranks' lengths alike, no skipped (non-finite) step. Returns (mean loss, mean masked share)."""
    totals = sums.clone()
    dist.all_reduce(totals)
    loss_val, frac, skipped = (totals / torch.tensor([world * len(lengths)] * 2 + [world], device=device)).tolist()
    check_lengths(lengths, step)
    if skipped or not math.isfinite(loss_val):
        raise common.UserError(f"the training loss became {loss_val} by step {step}; stopped (the non-finite step "
                               f"did not reach the weights). The last complete checkpoint is "
                               f"{newest_complete(out_dir)}; lower --lr or check the data")
    return loss_val, frac


def log_step(log, cfg, model, step, lr, norm, loss_val, frac, lengths, t_log, world, device, seconds, progress):
    """The log line and record of a log step: loss, lr, gradient norm, tokens/s, MFU, peak memory."""
    cuda = device.startswith("cuda")
    tok_s = cfg.batch_size * sum(lengths) / (time.time() - t_log)
    mfu = model_lib.estimate_mfu(model.flops_per_token(cfg.block_size, frac), tok_s / world,
                                 model_lib.device_peak_flops(device))
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    grad_norm = norm.item()
    rec = dict(step=step, loss=loss_val, lr=lr, grad_norm=grad_norm, seq_len=lengths[-1], tokens_per_sec=tok_s,
               tokens_per_sec_per_gpu=tok_s / world, mfu=mfu, peak_mem_gib=mem, seconds=seconds)
    log(f"step {step:6d} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm {grad_norm:.2f} | "
        f"{tok_s:,.0f} tok/s ({tok_s / world:,.0f}/GPU)" + (f" | MFU {100 * mfu:.1f}%" if mfu else "")
        + (f" | peak mem {mem:.1f} GiB" if mem else "") + f" | {progress.eta(step)}", **rec)
    return rec


def gather_slot_states(slots, data_states):
    """Every slot's data position (as after this step's batch) and mask generator, from all ranks."""
    mine = {i: {**data_states[i], "gen": slots[i].gen.get_state()} for i in slots}
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine, group=common.CONTROL)
    return {i: s for d in states for i, s in d.items()}


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
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=common.CONTROL)
    if mine.sum().item() != 0:
        raise RuntimeError(f"ranks trained the steps up to {step} on different lengths")


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
        g = torch.Generator(device).manual_seed(EVAL_SEED + c)
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
                try:
                    with open(self.path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                except OSError as e:
                    raise common.write_failure(self.path, e) from None


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(out_dir):
    """Complete checkpoints, oldest first: step_NNNNNNN folders (written as .tmp, renamed when whole)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(os.path.join(out_dir, d) for d in names if d.startswith("step_") and not d.endswith(".tmp"))


def newest_complete(out_dir):
    return (checkpoints(out_dir) or ["none"])[-1]


def latest_checkpoint(out_dir):
    """The newest complete checkpoint, as rank 0 sees it, on every rank (nodes may list a shared file
    system at different moments)."""
    return common.broadcast((checkpoints(out_dir) or [None])[-1] if dist.get_rank() == 0 else None)


PENDING = []     # the checkpoint being written: dict(response, tmp, final, out_dir, keep)
STAGER = None    # one stager for the run: its host buffers (pinned on CUDA) are reused by every save


def stager(device):
    """torch's DefaultStager, kept for the run: on CUDA it copies the state to pinned host buffers it
    reuses from save to save, on a side stream, while training goes on (the optimizer step waits
    for the copy: wait_for_staging); on CPUs it copies synchronously."""
    global STAGER
    if STAGER is None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        cuda = device.startswith("cuda")
        STAGER = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                              use_async_staging=cuda, use_non_blocking_copy=cuda))
    return STAGER


def save_checkpoint(out_dir, step, model, opt, extra, keep, device, model_only=False):
    """Sharded (torch.distributed.checkpoint: every rank writes its part) model and optimizer, plus
    rank 0's extra.pt (step, data positions and generators of every slot, history, settings),
    written as step_N.tmp and renamed by complete_saves once every rank's part is written.
    Asynchronous (dcp.async_save): the state is staged to host memory and written while training
    goes on. model_only: the last save of a run may drop the optimizer state (two thirds of the
    bytes); such a checkpoint exports and evaluates, it does not resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    complete_saves(block=True)
    final = os.path.join(out_dir, f"step_{step:07d}")
    tmp = final + ".tmp"

    def start():            # the leftovers of a run killed while saving go; extra.pt is written now
        if dist.get_rank() != 0:
            return
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        common.atomic_torch_save(dict(extra, model_only=model_only), os.path.join(tmp, "extra.pt"))
    try:
        common.on_every_rank(start)
    except common.UserError:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd} if model_only else {"model": msd, "optim": osd}
    response = dcp.async_save(state, checkpoint_id=tmp, process_group=SAVING, async_stager=stager(device))
    PENDING.append(dict(response=response, tmp=tmp, final=final, out_dir=out_dir, keep=keep))


def upload(pending):
    r = pending["response"]
    return r.upload_completion if hasattr(r, "upload_completion") else r


def wait_for_staging():
    for p in PENDING:
        if hasattr(p["response"], "staging_completion"):
            p["response"].staging_completion.result()


def complete_saves(block=False):
    """Make the checkpoint in flight complete once every rank's part is written (block: wait for it):
    the ranks agree over gloo that their writes are done, then rank 0 renames step_N.tmp to step_N and
    removes the oldest beyond --keep (this run's own: a fresh run never starts in a folder holding
    another's). A failed write (disk full) is one line on every rank, naming the checkpoint and the
    last complete one; its temporary folder is removed, earlier checkpoints stay intact."""
    if not PENDING:
        return
    done = torch.tensor([1.0 if block or all(upload(p).done() for p in PENDING) else 0.0])
    if dist.get_world_size() > 1:
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=common.CONTROL)
    if not done.item():
        return
    error = None
    for p in PENDING:
        try:
            upload(p).result()
        except (Exception, dist.checkpoint.api.CheckpointException) as e:     # the latter is a BaseException
            error = error or save_error(e, p["final"])
    try:
        common.agree(None if error is None else common.failure_of(error))
        if error is not None:
            raise error                      # a world of one: agree() is no collective there
    except BaseException:
        if dist.get_rank() == 0:
            for p in PENDING:
                shutil.rmtree(p["tmp"], ignore_errors=True)
        PENDING.clear()
        raise
    if dist.get_rank() == 0:
        for p in PENDING:
            if os.path.exists(p["final"]):
                shutil.rmtree(p["final"])
            os.replace(p["tmp"], p["final"])
            for old in checkpoints(p["out_dir"])[:-p["keep"]]:
                shutil.rmtree(old)
    PENDING.clear()


def save_error(e, final):
    """A checkpoint write that failed for the disk's reasons (an OSError on any rank) as a UserError;
    anything else stays what it was (a bug)."""
    causes = [e] + [pair[0] for pair in getattr(e, "failures", {}).values()]
    oserror = next((c for c in causes if isinstance(c, OSError)), None)
    return common.write_failure(final, oserror) if oserror is not None else e


def read_extra(path):
    """A checkpoint folder's extra.pt, checked before any collective: a half-written or corrupt
    checkpoint is a user error (delete it or start over)."""
    import torch.distributed.checkpoint as dcp
    try:
        dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise common.UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: truncated or corrupt); "
                               f"delete it, or start without --resume") from None
    return common.load_checkpoint(os.path.join(path, "extra.pt"))


def load_checkpoint(path, model, opt):
    """Model and optimizer shards of `path` into the (FSDP) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}

    def load():
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, dist.checkpoint.api.CheckpointException) as e:   # the latter is a BaseException
            raise common.UserError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: corrupt, or written by "
                                   f"other settings); delete it, or resume with the settings it was written with") \
                from None
    common.on_every_rank(load)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


BOOKKEEPING = ("log_every", "save_every", "keep", "export_dtype", "ac", "gpu_gib", "last_save_model_only")


def resume_from(latest, model, opt, slots, n_slots, cfg, data_id, allow_change=()):
    """Model, optimizer and every slot's state from the newest complete checkpoint (if any), after
    checking that it was written with this run's settings and data; returns the `run` dict the loop
    carries (step, history, seconds and tokens trained so far, the settings changed knowingly)."""
    if latest is None:
        return dict(step=0, history=[], seconds=0.0, tokens=0, changes={}, data_id=data_id)
    extra = common.on_every_rank(read_extra, latest)

    def settings():
        changes = check_resumable(latest, extra, asdict(cfg), allow_change)
        if extra.get("data_id") not in (None, data_id) and "data" not in allow_change:
            raise common.UserError(f"--resume: the data changed since {latest} was written (other files, sizes or "
                                   f"modification times under the same --data / --dataset); resume with the data "
                                   f"it was trained on, or pass --allow-change data")
        if len(extra["slots"]) != n_slots:
            raise common.UserError(f"checkpoint {latest} has {len(extra['slots'])} data slots, this run {n_slots} "
                                   f"(batch / micro-batch); resume with the same --batch-size and --micro-batch")
        return changes
    changes = common.on_every_rank(settings)
    load_checkpoint(latest, model, opt)
    for i, slot in slots.items():
        slot.load_state_dict(extra["slots"][i])
    return dict(step=extra["step"], history=extra["history"], seconds=extra["seconds"],
                tokens=extra.get("tokens", extra["step"] * cfg.batch_size * cfg.block_size), changes=changes,
                data_id=data_id)


def check_resumable(latest, extra, settings, allow_change):
    """A checkpoint --resume may continue: not a model-only last save, written with these settings
    (or ones --allow-change names). Returns the knowingly changed settings, for the summary."""
    if extra.get("model_only"):
        raise common.UserError(f"checkpoint {latest} holds the model only (the last save of a finished run, "
                               f"--last-save-model-only): export or evaluate it; it cannot be resumed")
    return {**extra.get("changes", {}), **common.check_resume_settings(extra["config"], settings, latest, allow_change,
                                                                      ignore=BOOKKEEPING)}


def resumed(latest, run):
    changed = f" with settings changed knowingly: {run['changes']}" if run["changes"] else ""
    return f"resumed {latest} at step {run['step']}{changed}"


# ----------------------------------------------------------------------------- the run's folder and its end

def check_export_path(export_dir, out_dir):
    """--export: a folder (or new), empty, and outside the checkpoints (which --keep prunes)."""
    if not export_dir:
        return
    where, run = os.path.abspath(export_dir), os.path.abspath(out_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise common.UserError(f"--export {export_dir} exists and is not a folder")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        raise common.UserError(f"--export {export_dir} holds an earlier export; choose another --export (nothing is "
                               f"ever written over an export)")
    if where == run or (where.startswith(run + os.sep) and os.path.relpath(where, run).startswith("step_")):
        raise common.UserError(f"--export {export_dir} lies inside --out-dir's checkpoints (--keep prunes those); "
                               f"choose a folder of its own")


def prepare_run(script, out_dir, export_dir, resume, settings, rank, allow_change=()):
    """Before any work, decided by rank 0 and agreed by all (common.claim_out_dir): "fresh",
    "resume" or "done" (this very run finished already: the caller only says where its result is).
    Otherwise the checkpoint to resume is checked (its settings), then the export path, and the
    out-dir is created, locked against a second writer, and proved visible to every rank."""
    def decide():
        if rank != 0:
            return None
        state = common.claim_out_dir(out_dir, script, settings, resume=resume, has_checkpoint=bool(checkpoints(out_dir)),
                                     ignore=BOOKKEEPING)
        if state == "resume":
            latest = checkpoints(out_dir)[-1]
            check_resumable(latest, read_extra(latest), settings, allow_change)
        if state != "done":
            check_export_path(export_dir or os.path.join(out_dir, "export"), out_dir)
            common.take_out_dir(out_dir)
        return state
    state = common.broadcast(common.on_every_rank(decide))
    if state != "done":
        check_shared(out_dir)
    return state


def export(model, folder, tok, ids, dtype):
    """One consolidated LLaDA-format folder: safetensors shards, config.json (LLaDA's key names)
    and tokenizer.json, all the next step (sft_8b.py, eval_8b.py) needs; written as FOLDER.tmp and
    renamed when whole. One parameter at a time is cast to the export dtype on its shards (half
    the bytes to move, in bf16), gathered, and kept on rank 0's CPU alone; the GPUs never hold the
    model whole. The other ranks are done after the last gather: none waits in a collective while
    rank 0 writes 16 GB."""
    dtype_ = getattr(torch, dtype)
    state = {}
    for name, p in model.state_dict().items():
        full = p.to(dtype_)
        full = full.full_tensor() if hasattr(full, "full_tensor") else full
        if dist.get_rank() == 0:
            state[name] = full.cpu()
        del full
    if dist.get_rank() != 0:
        return
    tmp = folder.rstrip(os.sep) + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model_lib.save_safetensors(state, tmp, dtype=dtype_)
        config = model_lib.config_to_json(model.cfg, eos_token_id=ids["eos"], pad_token_id=ids["eos"],
                                          bos_token_id=ids["bos"], torch_dtype=dtype)
        common.write_json(os.path.join(tmp, "config.json"), config)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        if os.path.isdir(folder):
            os.rmdir(folder)              # empty (check_export_path): never an earlier export
        os.replace(tmp, folder)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if common.is_write_failure(e):
            raise common.write_failure(folder, e) from None
        raise


def finish(script, cfg, model, out_dir, export_dir, tok, ids, run, plot, **notes):
    """Export, summary.json (and the held-out NLL curve); returns the summary on rank 0. `notes`
    (skipped rows, ...) and the settings changed on resume go into the summary beside the results."""
    export(model, export_dir or os.path.join(out_dir, "export"), tok, ids, cfg.export_dtype)
    summary = summarize(script, cfg, run, model, dist.get_world_size())
    summary.update(notes, **({"changed_on_resume": run["changes"]} if run["changes"] else {}))
    if dist.get_rank() != 0:
        return None
    common.write_json(os.path.join(out_dir, "summary.json"), summary)
    if plot:
        plot_runs([out_dir], os.path.join(out_dir, "heldout_nll.png"))
    return summary


def describe(cfg):
    return f"MD U[{cfg.t0:g}, {cfg.t1:g}]"


def summarize(script, cfg, run, model, world):
    history = run["history"]
    evals = [h for h in history if "test_loss" in h]
    trains = [h for h in history if "loss" in h]
    last = evals[-1] if evals else {"step": run["step"], "test_loss": None}
    return dict(script=script, settings=asdict(cfg), parameters=model.num_params(), world_size=world,
                steps=run["step"], tokens=run["tokens"], seconds=round(run["seconds"], 1),
                test_loss=last["test_loss"], train_loss=trains[-1]["loss"] if trains else None,
                test_loss_curve=[(h["step"], h["test_loss"]) for h in evals])


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
            raise common.UserError(f"--plot-runs: {summary} does not exist (is {d} a finished run?)")
        s = common.read_json(summary, "--plot-runs")
        if not s.get("test_loss_curve"):
            raise common.UserError(f"--plot-runs: {d} has no held-out evaluation")
        steps, nll = zip(*s["test_loss_curve"])
        ax.plot(steps, nll, "o-", ms=3, label=f"U[{s['settings']['t0']:g}, {s['settings']['t1']:g}] ({d})")
    ax.set(xlabel="step", ylabel="held-out NLL (full-range bound, nats/token)", title="Fig. 4: pre-training test loss")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def plot_runs_cli(a):
    """--plot-runs: the held-out NLL curves of the named runs on one figure in OUT_DIR (Fig. 4)."""
    out_dir = a.out_dir or "out/fig4"
    common.prepare_out_dir(out_dir)
    path = os.path.join(out_dir, a.runs_figure)
    plot_runs(a.plot_runs, path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- command line

def add_run_args(p, cls, figure, **defaults):
    """The command line pretrain_8b.py and sft_8b.py share: the common vocabulary (`defaults`: presets,
    preset, t0, t1), one flag per field of their config dataclass `cls`, and the flags below.
    `figure`: the file --plot-runs writes."""
    common.add_common_args(p, **defaults, resume_help="continue from the newest complete checkpoint in OUT_DIR "
                                                      "(none yet: a fresh run; a launcher may always pass it)",
                           dry_run_help="print the plan (parameters, FLOPs, memory per GPU by arithmetic and by a "
                                        "trace of one step on fake tensors, time) and exit")
    preset = defaults["preset"]
    common.add_config_args(p, cls, defaults["presets"][preset], f"{preset} preset")
    common.add_dist_args(p)
    p.set_defaults(runs_figure=figure)
    p.add_argument("--export", default=None, metavar="DIR",
                   help="write the LLaDA-format export here at the end of the run (default OUT_DIR/export)")
    p.add_argument("--plot-runs", nargs="+", default=None, metavar="RUN_DIR",
                   help=f"draw the held-out NLL of finished runs into OUT_DIR/{figure}")
    p.add_argument("--world-size", type=int, default=None, help="--dry-run: GPUs to plan for (default: the "
                                                                "launcher's, else 8)")
    p.add_argument("--plan-mfu", type=float, default=0.40, help="--dry-run: MFU to time the run at (%(default)s)")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="--dry-run: the arithmetic alone, without tracing a step on fake tensors")


def run_training(train, cfg, a, out_dir, device, compile_model, headline):
    """main()'s run in pretrain_8b.py and sft_8b.py: train, then on rank 0 the headline of its summary
    (or, for a finished run given again, where its result is); the groups torn down whatever happens."""
    try:
        summary = train(cfg, out_dir, device=device, resume=a.resume, compile_model=compile_model,
                        export_dir=a.export, plot=a.plot, allow_change=a.allow_change, timeout_s=a.dist_timeout)
        if summary == "done" and common.rank() == 0:
            print(common.already_done(out_dir, ("test_loss", "steps")))
        elif summary and summary != "done":
            print(f"{headline(summary)}; wrote {out_dir}/summary.json, {a.export or os.path.join(out_dir, 'export')}")
    finally:
        teardown()


def check_config(cfg, world):
    """User errors that every rank finds alike, before any work (pre-training's and SFT's settings)."""
    common.check_optimizer(cfg)
    common.check_positive(batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, block_size=cfg.block_size,
                          gpu_gib=cfg.gpu_gib)
    common.check_interval(cfg.t0, cfg.t1)
    if cfg.batch_size % (cfg.micro_batch * world):
        raise common.UserError(f"the global batch of {cfg.batch_size} sequences is not a multiple of micro-batch "
                               f"{cfg.micro_batch} x {world} processes; change --batch-size or --micro-batch")
    if cfg.schedule not in ("wsd", "cosine", "constant"):
        raise common.UserError(f"--schedule must be wsd, cosine or constant, got {cfg.schedule!r}")
    positive = ("max_steps", "eval_every", "save_every", "log_every", "eval_seqs", "eval_docs", "eval_rows",
                "eval_draws", "eval_batch", "keep")
    common.check_positive(**{name: getattr(cfg, name) for name in positive if hasattr(cfg, name)})
    if cfg.ac != "auto":
        ac_modes(cfg.ac, 1)
    if cfg.export_dtype not in ("float32", "bfloat16"):
        raise common.UserError(f"--export-dtype must be float32 or bfloat16, got {cfg.export_dtype!r}")
    common.check_optimizer(cfg)


def check_plan_args(a):
    """The --dry-run and --benchmark flags, before anything is planned or built."""
    common.check_positive(plan_mfu=a.plan_mfu, **({"world_size": a.world_size} if a.world_size is not None else {}))
    if a.plan_mfu > 1:
        raise common.UserError(f"--plan-mfu is a fraction of the peak (0.4 = 40%), got {a.plan_mfu}")
    for name in ("bench_steps",):
        if hasattr(a, name):
            common.check_positive(**{name: getattr(a, name)})
    if getattr(a, "bench_layers", 0) < 0:
        raise common.UserError(f"--bench-layers must be >= 0 (0: the preset's), got {a.bench_layers}")
