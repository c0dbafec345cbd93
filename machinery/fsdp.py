"""
FSDP2 training of the LLaDA-shaped models (pretrain_8b.py, sft_8b.py), in torchtitan's shape without its
framework, one small function per concern:

    parallelize   activation checkpointing by policy and compile, per block, then the FSDP2 units
    build         the model on `meta`, parallelized, materialised and initialised shard by shard
    Meter         what a step adds up on the device, read back on check steps only (no host sync)
    heldout_nll   the held-out NLL of Fig. 4 (masking's full-range bound), chunked over the ranks
    ShardedCheckpoints  torch.distributed.checkpoint, asynchronous, complete as soon as every rank wrote
    export        one LLaDA-format folder (llada.py's format), gathered one parameter at a time

Every rank runs the same code; rank 0 alone prints and writes shared files. Surviving a lost worker:
launch with torchrun --max-restarts N and always pass --resume; a restart loses at most the steps
since the last complete checkpoint.
"""
import argparse
import contextlib
import math
import os
import shutil
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import masking
import model as model_lib
from machinery import cli, distributed, files, llada
from machinery.cli import UserError, check_interval, check_positive, check_settings

EVAL_SEED = 1234                # held-out chunk c is masked by generator EVAL_SEED + c in every run


# ----------------------------------------------------------------------------- settings

def check_run_settings(cfg, world_size):
    """User errors that every rank finds alike, before any work (pre-training's and SFT's settings)."""
    check_settings(cfg)
    check_positive(batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, block_size=cfg.block_size,
                   gpu_gib=cfg.gpu_gib)
    check_interval(cfg.t0, cfg.t1)
    if cfg.batch_size % (cfg.micro_batch * world_size):
        raise UserError(f"the global batch of {cfg.batch_size} sequences is not a multiple of micro-batch "
                        f"{cfg.micro_batch} x {world_size} processes; change --batch-size or --micro-batch")
    if cfg.schedule not in ("wsd", "cosine", "constant"):
        raise UserError(f"--schedule must be wsd, cosine or constant, got {cfg.schedule!r}")
    positive = ("max_steps", "eval_every", "save_every", "log_every", "eval_seqs", "eval_docs", "eval_rows",
                "eval_draws", "eval_batch", "keep")
    check_positive(**{name: getattr(cfg, name) for name in positive if hasattr(cfg, name)})
    if cfg.ac != "auto":
        ac_modes(cfg.ac, 1)
    if cfg.export_dtype not in ("float32", "bfloat16"):
        raise UserError(f"--export-dtype must be float32 or bfloat16, got {cfg.export_dtype!r}")


BOOKKEEPING = ("log_every", "save_every", "keep", "export_dtype", "ac", "gpu_gib", "last_save_model_only")


def parser(description, presets, preset, t0, t1):
    """The command line of pretrain_8b.py and sft_8b.py: the shared vocabulary (cli.parser) and the flags
    of the settings the two share; each script adds its own."""
    p = cli.parser(description, presets=presets, preset=preset, t0=t0, t1=t1, torchrun=True,
                   resume_help="continue from the newest complete checkpoint in OUT_DIR (none yet: a fresh run; a "
                               "launcher may always pass it)",
                   dry_run_help="print the plan (parameters, FLOPs, memory per GPU by arithmetic and by a trace of "
                                "one step on fake tensors, time) and exit; nothing is trained")
    add_run_flags(p)
    return p


def add_run_flags(p):
    """The flags of the settings pretrain_8b.py and sft_8b.py share (the shared vocabulary aside: cli's)."""
    shape = p.add_argument_group("batch")
    shape.add_argument("--block-size", type=int, help="tokens per sequence")
    shape.add_argument("--batch-size", type=int, help="sequences per optimizer step, all GPUs together")
    shape.add_argument("--micro-batch", type=int, help="sequences per GPU per forward; the rest is accumulated")
    optim = p.add_argument_group("optimisation (Table 4)")
    optim.add_argument("--lr", type=float, help="AdamW peak learning rate")
    optim.add_argument("--min-lr", type=float, help="the schedule's floor")
    optim.add_argument("--warmup", type=int, help="linear warm-up steps")
    optim.add_argument("--schedule", help="wsd (LLaDA: warm-up, constant, linear decay) | cosine | constant")
    optim.add_argument("--decay-frac", type=float, help="wsd: share of the steps, at the end, of linear decay")
    optim.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    optim.add_argument("--beta2", type=float, help="AdamW beta2")
    optim.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this (0: never)")
    run = p.add_argument_group("evaluation, checkpoints, memory")
    run.add_argument("--eval-every", type=int, help="steps between held-out NLL evaluations")
    run.add_argument("--eval-draws", type=int, help="stratified t draws per held-out sequence")
    run.add_argument("--eval-batch", type=int, help="held-out sequences per evaluation forward (x eval-draws)")
    run.add_argument("--log-every", type=int, help="steps between log lines (and host syncs)")
    run.add_argument("--save-every", type=int, help="steps between sharded checkpoints")
    run.add_argument("--keep", type=int, help="complete checkpoints kept")
    run.add_argument("--ac", help="activation checkpointing: auto (the plan picks for --gpu-gib) | none | full | "
                                  "selective | every-N")
    run.add_argument("--gpu-gib", type=float, help="memory of one GPU, for the plan and --ac auto (H100: 80, H200: 141)")
    run.add_argument("--last-save-model-only", action=argparse.BooleanOptionalAction,
                     help="the run's last checkpoint without the optimizer (it exports, it does not resume)")
    run.add_argument("--export-dtype", help="dtype of the exported safetensors: bfloat16 (LLaDA's) | float32")
    run.add_argument("--export", default=None, metavar="DIR",
                     help="write the LLaDA-format export here at the end of the run (default OUT_DIR/export)")
    run.add_argument("--plot-runs", nargs="+", default=None, metavar="RUN_DIR",
                     help="draw the held-out NLL of finished runs of this script into one figure in OUT_DIR")


def run_summary(run, model, meter):
    """What every 8B run reports: its size, world, steps, tokens, seconds and held-out NLL curve."""
    evals = [h for h in run.history if "test_loss" in h]
    trains = [h for h in run.history if "loss" in h]
    return dict(parameters=model.num_params(), world_size=run.world.size, steps=run.step, tokens=meter.tokens,
                seconds=round(run.seconds(), 1), test_loss=evals[-1]["test_loss"] if evals else None,
                train_loss=trains[-1]["loss"] if trains else None,
                test_loss_curve=[(h["step"], h["test_loss"]) for h in evals])


def plot_runs(run_dirs, script, path, title, ylabel):
    """The held-out NLL of several finished runs of `script` against the step, one curve per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in run_dirs:
        summary = os.path.join(d, "summary.json")
        if not os.path.exists(summary):
            raise UserError(f"--plot-runs: {summary} does not exist (is {d} a finished run?)")
        s = files.read_json(summary, "--plot-runs")
        if s.get("script") != script:
            raise UserError(f"--plot-runs: {d} holds a run of {s.get('script') or 'another script'}, not of "
                            f"{script}: its curve does not belong on this figure")
        if not s.get("test_loss_curve"):
            raise UserError(f"--plot-runs: {d} has no held-out evaluation")
        steps, nll = zip(*s["test_loss_curve"])
        ax.plot(steps, nll, "o-", ms=3, label=f"U[{s['settings']['t0']:g}, {s['settings']['t1']:g}] ({d})")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    files.save_figure(fig, path)


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
        raise UserError(f"--ac must be auto, none, full, selective or every-N (N >= 1), got {policy!r}")
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
    index = llada.safetensors_index(path_or_id)
    expected = model.state_dict()
    llada.check_fit(index, expected, path_or_id)
    for k, p in expected.items():
        p.copy_(shard_like(llada.read_tensor(index[k]).to(device=p.device, dtype=p.dtype), p))


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


def eager_unless(full_shape):
    """LLaDA's random-length steps (1%) and ragged evaluation chunks run eagerly: the compiled blocks
    keep one static graph for the full (micro-batch, block) shape instead of recompiling, or going
    dynamic, for every shape drawn."""
    return contextlib.nullcontext() if full_shape else torch.compiler.set_stance("force_eager")


# ----------------------------------------------------------------------------- the check step

class Meter:
    """Loss, masked share and non-finite steps, added up on the device and read back on check steps
    only (log, eval, save, last): a step never waits for the host. A step whose gradient norm is not
    finite leaves the weights as they were (the fused AdamW skips it on the GPU, as under a
    GradScaler); the next check stops the run, before any checkpoint could hold it."""

    def __init__(self, run, cfg, model, tokens=0):
        self.run, self.cfg, self.model, self.tokens = run, cfg, model, tokens
        self.sums = torch.zeros(3, device=run.device)           # loss, masked share, skipped steps
        self.lengths, self.t_log = [], time.time()

    def add(self, loss, masked, n_micro):
        self.sums[:2] += torch.stack([loss.detach(), masked.float().mean()]) / n_micro

    def end_step(self, opt, norm, length):
        """Before the optimizer step: the fused AdamW's found_inf is set (a step whose gradient norm is not
        finite is skipped on the device), and the step's sequence length and tokens are counted."""
        opt.found_inf = (~torch.isfinite(norm)).float()
        self.sums[2] += opt.found_inf
        self.lengths.append(length)
        self.tokens += self.cfg.batch_size * length

    def due(self, step):
        """Is `step` a check step: a log, eval or save step, or the last? (Between them, nothing syncs.)"""
        c = self.cfg
        return step == c.max_steps or any(step % every == 0 for every in (c.log_every, c.eval_every, c.save_every))

    def check(self, step):
        """The ranks meet: a checkpoint written since the last check is made complete, the summed loss
        and masked share are read, the ranks' sequence lengths compared, and a non-finite step stops
        the run. Returns (mean loss, mean masked share) since the last log step."""
        self.run.checkpoints.poll()
        world = self.run.world.size
        totals = self.sums.clone()
        dist.all_reduce(totals)
        loss, frac, skipped = (totals / torch.tensor([world * len(self.lengths)] * 2 + [world],
                                                     device=self.run.device)).tolist()
        mine = torch.tensor([sum(self.lengths), -sum(self.lengths)], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.run.world.control)
        if mine.sum().item() != 0:   # LLaDA's random lengths are drawn from the step: every rank crops alike
            raise RuntimeError(f"ranks trained the steps up to {step} on different lengths")
        if skipped or not math.isfinite(loss):
            kept = ("the non-finite step did not reach the weights" if finite_weights(self.model, self.run) else
                    "the weights hold NaN or inf; nothing of them was saved")
            raise UserError(f"the training loss became {loss} by step {step}; stopped ({kept}). "
                            f"{self.run.checkpoint_note().capitalize()}; lower --lr or check the data")
        return loss, frac

    def record(self, step, lr, norm, loss, frac):
        """The log step's record and line: loss, lr, gradient norm, tokens/s, MFU, peak memory. Resets
        the sums."""
        cfg, world, device = self.cfg, self.run.world.size, self.run.device
        tok_s = cfg.batch_size * sum(self.lengths) / (time.time() - self.t_log)
        mfu = model_lib.estimate_mfu(self.model.flops_per_token(cfg.block_size, frac), tok_s / world,
                                     model_lib.device_peak_flops(device))
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
        rec = dict(step=step, loss=loss, lr=lr, grad_norm=norm.item(), seq_len=self.lengths[-1], tokens_per_sec=tok_s,
                   tokens_per_sec_per_gpu=tok_s / world, mfu=mfu, peak_mem_gib=mem, seconds=self.run.seconds())
        line = (f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {rec['grad_norm']:.2f} | "
                f"{tok_s:,.0f} tok/s ({tok_s / world:,.0f}/GPU)" + (f" | MFU {100 * mfu:.1f}%" if mfu else "")
                + (f" | peak mem {mem:.1f} GiB" if mem else "") + f" | {self.run.eta(step, cfg.max_steps)}")
        self.sums.zero_()
        self.lengths, self.t_log = [], time.time()
        return line, rec


# ----------------------------------------------------------------------------- the held-out NLL

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


# ----------------------------------------------------------------------------- checkpoints

class ShardedCheckpoints:
    """OUT_DIR/step_NNNNNNN/: the model and optimizer through torch.distributed.checkpoint (every rank
    writes its shards) plus rank 0's extra.pt (step, every data slot's position and generator,
    history, settings, inputs), written as step_N.tmp and renamed once every rank's part is written;
    the newest `keep` are kept. Asynchronous (dcp.async_save): the state is staged to host memory
    (pinned buffers reused from save to save on CUDA) and written while training goes on; the
    optimizer's next step waits for the copy, never for the write."""

    def __init__(self, keep):
        self.keep, self.pending, self.stager, self.saving, self.hooked = keep, [], None, None, set()

    def bind(self, run):
        self.run, self.out_dir = run, run.out_dir
        if dist.is_initialized():        # the group async saves run on: theirs alone, nothing interleaves
            self.saving = dist.new_group(backend="gloo", timeout=timedelta(seconds=run.world.timeout_s))

    def complete(self):
        return checkpoints(self.out_dir)

    def latest(self):
        return (self.complete() or [None])[-1]

    def note(self):
        return f"the last complete checkpoint is {self.latest() or 'none'}"

    def read(self, path):
        """A checkpoint folder's extra.pt, checked before any collective: a half-written or corrupt
        checkpoint is a user error (delete it or start over)."""
        import torch.distributed.checkpoint as dcp
        try:
            dcp.FileSystemReader(path).read_metadata()
        except Exception as e:
            raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: truncated or corrupt); "
                            f"delete it, or start without --resume") from None
        return files.load_checkpoint(os.path.join(path, "extra.pt"))

    def load(self, path, objects):
        """Model and optimizer shards of `path` into the (FSDP) model and optimizer; the other objects
        (the data slots) from extra.pt. Every rank reads; a failure on one stops all."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model, opt = objects.pop("model"), objects.pop("opt")
        extra = distributed.on_every_rank(lambda: self.read(path), self.run.world)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}

        def load():
            try:
                dcp.load(state, checkpoint_id=path)
            except (Exception, dist.checkpoint.api.CheckpointException) as e:   # the latter is a BaseException
                raise UserError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: corrupt, or written by "
                                f"other settings); delete it, or resume with the settings it was written with") \
                    from None
        distributed.on_every_rank(load, self.run.world)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if not finite_weights(model, self.run):
            raise UserError(f"checkpoint {path} holds NaN or inf weights: it cannot be resumed (delete it, or choose "
                            f"another --out-dir)")
        with self.run.together():
            for name, obj in objects.items():
                obj.load_state_dict(extra[name])
        return extra

    def save(self, step, state, objects):
        """Step `step`'s checkpoint: model and optimizer asynchronously, the rest (`state`, and the other
        objects' state_dict: the data slots' positions, gathered from every rank) in extra.pt now.
        model_only=True: the last save of a run may drop the optimizer state (two thirds of the bytes);
        such a checkpoint exports and evaluates, it does not resume. Weights that are not finite are
        never written."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from machinery.run import state_of
        self.complete_saves(block=True)
        model, opt = objects.pop("model"), objects.pop("opt")
        if id(opt) not in self.hooked:         # the optimizer's step waits for a checkpoint's copy of the weights
            opt.register_step_pre_hook(lambda *args: self.wait_for_staging())
            self.hooked.add(id(opt))
        extra = dict(state, **{name: state_of(obj) for name, obj in objects.items()})
        final = os.path.join(self.out_dir, f"step_{step:07d}")
        tmp = final + ".tmp"

        def start():            # the leftovers of a run killed while saving go; extra.pt is written now
            if not self.run.master:
                return
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
            files.atomic_torch_save(extra, os.path.join(tmp, "extra.pt"), note=self.note())
        try:
            distributed.on_every_rank(start, self.run.world)
        except UserError:
            if self.run.master:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        msd, osd = get_state_dict(model, opt)
        sharded = {"model": msd} if extra.get("model_only") else {"model": msd, "optim": osd}
        try:
            response = dcp.async_save(sharded, checkpoint_id=tmp, process_group=self.saving,
                                      async_stager=self._stager())
        except (Exception, dist.checkpoint.api.CheckpointException) as e:     # the latter is a BaseException
            error = self.save_error(e, final)
            distributed.agree(distributed.failure_of(error), self.run.world.control)
            if self.run.master:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error from None
        self.pending.append(dict(response=response, tmp=tmp, final=final))

    def check(self, step, objects):
        """Weights that hold NaN or inf on any rank are never written (agreed over the ranks)."""
        check_finite_weights(objects["model"], step, self.run)

    def _stager(self):
        """torch's DefaultStager, kept for the run: on CUDA it copies the state to pinned host buffers it
        reuses from save to save, on a side stream, while training goes on; on CPUs synchronously."""
        if self.stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            cuda = self.run.device.startswith("cuda")
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                       use_async_staging=cuda, use_non_blocking_copy=cuda))
        return self.stager

    def wait_for_staging(self):
        """An async checkpoint's copy of the weights is whole before the optimizer changes them."""
        for p in self.pending:
            if hasattr(p["response"], "staging_completion"):
                p["response"].staging_completion.result()

    def poll(self):
        self.complete_saves(block=False)

    def wait(self):
        self.complete_saves(block=True)

    def complete_saves(self, block=False):
        """Make the checkpoint in flight complete once every rank's part is written (block: wait for it):
        the ranks agree over gloo that their writes are done, then rank 0 renames step_N.tmp to step_N
        and removes the oldest beyond --keep (this run's own: a fresh run never starts in a folder
        holding another's). A failed write (disk full) is one line on every rank, naming the
        checkpoint and the last complete one; its temporary folder is removed, earlier checkpoints stay
        intact."""
        if not self.pending:
            return
        upload = lambda p: getattr(p["response"], "upload_completion", p["response"])
        done = torch.tensor([1.0 if block or all(upload(p).done() for p in self.pending) else 0.0])
        if dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.run.world.control)
        if not done.item():
            return
        error = None
        for p in self.pending:
            try:
                upload(p).result()
            except (Exception, dist.checkpoint.api.CheckpointException) as e:     # the latter is a BaseException
                error = error or self.save_error(e, p["final"])
        try:
            distributed.agree(None if error is None else distributed.failure_of(error), self.run.world.control)
            if error is not None:
                raise error                      # a world of one: agree() is no collective there
        except BaseException:
            if self.run.master:
                for p in self.pending:
                    shutil.rmtree(p["tmp"], ignore_errors=True)
            self.pending.clear()
            raise
        if self.run.master:
            for p in self.pending:
                if os.path.exists(p["final"]):
                    shutil.rmtree(p["final"])
                os.replace(p["tmp"], p["final"])
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old)
        self.pending.clear()

    def save_error(self, e, final):
        """A checkpoint write that failed for the disk's reasons (an OSError on any rank) as a UserError;
        anything else stays what it was (a bug)."""
        causes = [e] + [pair[0] for pair in getattr(e, "failures", {}).values()]
        oserror = next((c for c in causes if isinstance(c, OSError)), None)
        return files.write_failure(final, oserror, self.note()) if oserror is not None else e

    def close(self, failed=False):
        """The end of the run: the checkpoint in flight completed (unless the run failed), the stager closed."""
        try:
            if not failed:
                self.complete_saves(block=True)
        finally:
            if self.stager is not None:
                self.stager.close()
                self.stager = None
            if failed:
                self.pending.clear()


def checkpoints(out_dir):
    """Complete checkpoints, oldest first: step_NNNNNNN folders (written as .tmp, renamed when whole)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(os.path.join(out_dir, d) for d in names if d.startswith("step_") and not d.endswith(".tmp"))


def finite_weights(model, run):
    """Every rank's shards of every parameter finite (agreed over the ranks)."""
    bad = torch.tensor([float(any(not torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p).all()
                                  for p in model.parameters()))])
    if run.world.size > 1:
        dist.all_reduce(bad, group=run.world.control)
    return not bad.item()


def check_finite_weights(model, step, run):
    """Weights that hold NaN or inf are never written as a checkpoint (a resume would start from them)."""
    if not finite_weights(model, run):
        raise UserError(f"the weights hold NaN or inf at step {step}: not saved. {run.checkpoint_note().capitalize()}; "
                        f"lower --lr or check the data")


# ----------------------------------------------------------------------------- export

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
        llada.save_safetensors(state, tmp, dtype=dtype_)
        config = llada.config_to_json(model.cfg, eos_token_id=ids["eos"], pad_token_id=ids["eos"],
                                      bos_token_id=ids["bos"], torch_dtype=dtype)
        files.write_json(os.path.join(tmp, "config.json"), config)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        if os.path.isdir(folder):
            os.rmdir(folder)              # empty (check_export_path): never an earlier export
        os.replace(tmp, folder)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if files.is_write_failure(e) or "I/O error" in str(e):     # safetensors reports a full disk as its own error
            raise files.write_failure(folder, e) from None
        raise


def export_path(export_dir, out_dir, steps):
    """Where a run's export goes: --export, or OUT_DIR/export; when that holds the export of an earlier,
    shorter run of this folder (the run is being extended), OUT_DIR/export_step_N (N: --max-steps). No
    export is ever written over, and summary.json names the one that holds the run's weights."""
    if export_dir is None:
        export_dir = os.path.join(out_dir, "export")
        if os.path.isdir(export_dir) and os.listdir(export_dir):
            export_dir = os.path.join(out_dir, f"export_step_{steps:07d}")
    check_export_path(export_dir, out_dir)
    return export_dir


def check_export_path(export_dir, out_dir):
    """--export: a folder (or new), empty, and outside the checkpoints (which --keep prunes)."""
    where, run = os.path.abspath(export_dir), os.path.abspath(out_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise UserError(f"--export {export_dir} exists and is not a folder")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        raise UserError(f"--export {export_dir} holds an earlier export; choose another --export (nothing is "
                        f"ever written over an export)")
    if where == run or (where.startswith(run + os.sep) and os.path.relpath(where, run).startswith("step_")):
        raise UserError(f"--export {export_dir} lies inside --out-dir's checkpoints (--keep prunes those); "
                        f"choose a folder of its own")
