"""
Supervised fine-tuning of LLaDA-8B-Base on tulu-3 personas math, with the paper's mask-ratio
intervals (paper §5.2.2, App. F.5-F.6; Table 4's hyper-parameters are the defaults).

    torchrun --nproc_per_node=8 sft_8b.py                               # t ~ U[0, 1], the standard recipe
    torchrun --nproc_per_node=8 sft_8b.py --preset t0.45-0.55           # the signal-rich window (Table 2)
    torchrun --nproc_per_node=8 sft_8b.py --preset t0.5-1               # Table 3's best for GSM8K / MATH
    torchrun --nproc_per_node=2 sft_8b.py --preset tiny --device cpu --data rows.jsonl --max-steps 4

Each row's `messages` go through LLaDA's chat template; the last assistant turn is the answer.
The prompt is never masked (t ~ U[t0, t1] masks answer positions only, LLaDA §2.3); each row
is right-padded with EOS to the block and the padding counts as answer, so the model learns
to stop; the loss is normalised per row by its answer length (LLaDA's Eq. 5 and its GUIDELINES.md
recipe; the paper does not say).

Reading order: Table 4's settings and the interval presets, then train(): the rows in LLaDA's chat
format (machinery/llada.py), the --init model under FSDP2, the loop with its step, the held-out
answer NLL, checkpoints, the export and the summary; then the rows and their data slots, the output
folder and the figure, and the command line.
"""
import os
from dataclasses import dataclass

import torch

import masking
from machinery import cli, distributed, fsdp, llada, plan
from machinery.cli import UserError
from machinery.files import check_utf8
from machinery.optim import clip_gradients, lr_at
from machinery.run import Run

TULU = "allenai/tulu-3-sft-personas-math-filtered"


@dataclass
class SFTConfig:
    init: str = llada.LLADA              # Hub id or LLaDA-format folder (a pretrain_8b.py export too); "" = scratch
    model: str = "tiny"               # model.py preset when --init is ""
    dataset: str = TULU               # Hub dataset with a `messages` column; --data reads a local jsonl instead
    data: str = ""                    # local jsonl of rows with `messages` (no download)
    tokenizer: str = ""               # default: --init's tokenizer.json (bytes when training from scratch)
    block_size: int = 1024            # tokens per row: prompt, answer, EOS padding
    batch_size: int = 256             # rows per optimizer step, all GPUs together (§5.2.2)
    micro_batch: int = 4              # rows per GPU per forward; the rest is accumulated
    max_steps: int = 1200             # ~4 epochs of the 80.5k rows (§5.2.2)
    lr: float = 2e-5                  # AdamW peak learning rate (Table 4)
    min_lr: float = 2e-6              # the schedule's floor
    warmup: int = 160                 # linear warm-up steps
    schedule: str = "wsd"             # LLaDA's SFT: warm-up, constant, linear decay over the last 10%
    decay_frac: float = 0.1           # wsd: share of the steps, at the end, of linear decay
    weight_decay: float = 0.0         # AdamW weight decay
    beta2: float = 0.95               # AdamW beta2
    grad_clip: float = 1.0            # clip the global gradient norm to this (0: never)
    t0: float = 0.0
    t1: float = 1.0
    eval_every: int = 100             # steps between held-out answer-NLL evaluations
    eval_rows: int = 256              # the first usable rows, held out: their answers' full-range bound
    eval_draws: int = 4               # stratified t draws per held-out row
    eval_batch: int = 4               # held-out rows per evaluation forward
    log_every: int = 10               # steps between log lines
    save_every: int = 200             # steps between sharded checkpoints
    keep: int = 2                     # complete checkpoints kept
    ac: str = "auto"                  # activation checkpointing: auto (the plan picks for --gpu-gib) | none | full | selective | every-N
    gpu_gib: float = 80.0             # memory of one GPU, for the plan and --ac auto (H100: 80, H200: 141)
    last_save_model_only: bool = False  # the run's last checkpoint without the optimizer (exports, does not resume)
    export_dtype: str = "bfloat16"    # dtype of the exported safetensors: bfloat16 (LLaDA's) | float32
    seed: int = 0


# The paper's interval ablations (Tables 2-3) on Table 4's settings; --t0/--t1 set any other.
INTERVALS = {"t0-1": (0.0, 1.0), "t0.45-0.55": (0.45, 0.55), "t0.2-1": (0.2, 1.0), "t0.3-1": (0.3, 1.0),
             "t0.5-1": (0.5, 1.0)}
PRESETS = {name: dict(t0=t0, t1=t1) for name, (t0, t1) in INTERVALS.items()}
# seconds on a laptop CPU: a tiny model from scratch (or --init a tiny pretrain_8b.py export), bytes
PRESETS["tiny"] = dict(init="", model="tiny", block_size=64, batch_size=8, micro_batch=2, max_steps=20, lr=3e-3,
                       min_lr=3e-4, warmup=2, eval_every=10, eval_rows=8, eval_draws=4, eval_batch=4, log_every=1,
                       save_every=5, export_dtype="float32")


SCRIPT = "sft_8b.py"
EPOCH_SEED_STRIDE = 7919        # epoch e of a run seeded s orders its rows by generator s * stride + e
SLOT_SEED_STRIDE = 1_000_003    # slot i of a run seeded s draws its masks from generator s * stride + i (as dclm's)


# ----------------------------------------------------------------------------- the experiment

def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, export_dir=None, plot=False,
          allow_change=(), timeout_s=600.0):
    """One SFT run under torchrun (or as a world of one); returns the summary (the finished one, marked
    done, when OUT_DIR holds this very run)."""
    fsdp.check_run_settings(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    inputs = {"data": cfg.data or cfg.dataset, "init": cfg.init or "scratch"}
    with Run(SCRIPT, cfg, out_dir, resume=resume, allow_change=allow_change, bookkeeping=fsdp.BOOKKEEPING, inputs=inputs,
             checkpoints=fsdp.ShardedCheckpoints(cfg.keep), torchrun=True, device=device, timeout_s=timeout_s,
             log_file=True, report=("test_loss", "steps")) as run:
        if run.done:
            return run.finished()[0]
        export_dir = fsdp.export_path(export_dir, out_dir, cfg.max_steps)
        device = run.device
        with run.together():
            # the chat format (LLaDA's template) and the model to fine-tune: --init's, or a preset from scratch
            tok, tok_ids = llada.chat_tokenizer(cfg.tokenizer, cfg.init)
            model_cfg = llada.init_config(cfg.init, cfg.model, tok_ids, cfg.block_size)
            # data: each usable row as prompt + answer + EOS padding with its answer mask; the first eval_rows held out
            all_ids, all_masks, skipped = encode_rows(load_rows(cfg), tok, tok_ids["eos"], cfg.block_size)
            if len(all_ids) <= cfg.eval_rows:
                raise UserError(f"{cfg.data or cfg.dataset}: {len(all_ids)} usable rows, not more than the "
                                f"{cfg.eval_rows} held out (--eval-rows); skipped: {describe_bad_rows(skipped) or 'none'}")
            eval_ids, eval_masks, train_ids, train_masks, duplicates = split_held_out(all_ids, all_masks, cfg.eval_rows)
            if len(train_ids) == 0:
                raise UserError(f"{cfg.data or cfg.dataset}: every training row repeats a held-out row")
            data = Slots(train_ids, train_masks, cfg, run.world)

        # model: --init's weights (LLaDA-8B-Base) into FSDP2 shards, activation checkpointing by the plan
        model, opt = fsdp.build(model_cfg, cfg, device, compile_model,
                                plan.choose_ac(cfg, run.world, device, model_cfg))
        if cfg.init and run.latest is None:    # resuming, the checkpoint's weights replace --init's
            with run.together(), cli.user_input():          # weights that do not fit: one line naming the file
                fsdp.load_sharded(model, cfg.init)
        saved = run.restore(model=model, opt=opt, data=data)
        n_slots = cfg.batch_size // cfg.micro_batch
        run.log(f"SFT {describe(cfg)} from {cfg.init or 'scratch (' + cfg.model + ')'}: {model.num_params():,} "
                f"parameters, {len(train_ids):,} training rows ({len(eval_ids)} held out" + (
                    f", {duplicates} training rows repeating them dropped" if duplicates else "") +
                f"), batch {cfg.batch_size} x {cfg.block_size} ({n_slots // run.world.size} x {cfg.micro_batch} x "
                f"{run.world.size} GPUs), {cfg.max_steps} steps on {device}")
        if skipped:
            run.log(f"skipped {sum(c for _, c in skipped.values())} malformed rows: {describe_bad_rows(skipped)}",
                    skipped={k: c for k, (_, c) in skipped.items()})

        ce = masking.compiled_token_ce() if compile_model else masking.token_ce
        meter = fsdp.Meter(run, cfg, model, tokens=saved["tokens"] if saved else 0)
        data.start(run.step)                   # the rows of a step follow from the step: resumed exactly
        for step in range(run.step, cfg.max_steps):
            # ----------------------------------------------------------------------------- the step
            lr = lr_at(step, cfg.lr, warmup=cfg.warmup, max_steps=cfg.max_steps, schedule=cfg.schedule,
                       min_lr=cfg.min_lr, decay_frac=cfg.decay_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            micro = data.next()                # this rank's micro-batches: (rows, answer masks, their masks' generator)
            for x0, answer, gen in micro:      # t ~ U[t0, t1] masks answer positions only; 1/t CE per answer length
                loss, masked = masking.md_step_loss(model, x0.to(device, non_blocking=True), model.cfg.mask_id, cfg.t0,
                                                    cfg.t1, generator=gen, maskable=answer.to(device, non_blocking=True),
                                                    ce_fn=ce)
                (loss / len(micro)).backward()
                meter.add(loss, masked, len(micro))
            norm = clip_gradients(model.parameters(), cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            meter.end_step(opt, norm, cfg.block_size)  # a non-finite norm: the fused AdamW skips the step
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
                nll = fsdp.heldout_nll(model, eval_ids, cfg, device, maskable=eval_masks)
                run.log(f"step {steps_done:6d} | held-out answer NLL {nll:.4f} (full-range bound, nats/token)",
                        step=steps_done, test_loss=nll)
            if steps_done % cfg.save_every == 0 or steps_done == cfg.max_steps:
                run.save(steps_done, model=model, opt=opt, data=data, tokens=meter.tokens,
                         model_only=steps_done == cfg.max_steps and cfg.last_save_model_only)

        run.complete_checkpoints()             # the last checkpoint whole on disk before the export
        fsdp.export(model, export_dir, tok, tok_ids, cfg.export_dtype)
        summary = run.finish(dict(fsdp.run_summary(run, model, meter), export=export_dir,
                                  skipped_rows={k: c for k, (_, c) in skipped.items()},
                                  held_out_duplicates_dropped=duplicates))
    if plot and run.master:
        plot_runs([out_dir], os.path.join(out_dir, "heldout_nll.png"))
    return summary


def describe(cfg):
    return f"MD U[{cfg.t0:g}, {cfg.t1:g}]"


# ----------------------------------------------------------------------------- the rows

def encode_rows(rows, tok, eos, block):
    """Every usable row as (ids, answer mask), both `block` long: prompt, answer, EOS padding (part of
    the answer). Malformed rows are skipped and counted by reason, with the first row of each reason.
    Prompts and answers are encoded apart (chat_ids), all rows in one encode_batch each."""
    texts, skipped = [], {}

    def skip(n, why):
        first, count = skipped.get(why, (n, 0))
        skipped[why] = (first, count + 1)
    for n, row in enumerate(rows):
        try:
            if row.get("messages") is None:
                raise ValueError("no `messages`")
            texts.append((n, *llada.chat_text(row["messages"])))
        except ValueError as e:
            skip(n, str(e))
    prompts = tok.encode_batch([p for _, p, _ in texts], add_special_tokens=False)
    answers = tok.encode_batch([a for _, _, a in texts], add_special_tokens=False)
    ids, masks = [], []
    for (n, _, _), p, a in zip(texts, prompts, answers):
        p, a = p.ids, a.ids
        if len(p) >= block:
            skip(n, f"prompt longer than the block of {block}")
        elif len(p) + len(a) > block:
            skip(n, f"prompt and answer longer than the block of {block}")
        else:
            ids.append(p + a + [eos] * (block - len(p) - len(a)))
            masks.append([False] * len(p) + [True] * (block - len(p)))
    skipped = dict(sorted(skipped.items(), key=lambda kv: kv[1][0]))      # by first row, as they were met
    return torch.tensor(ids, dtype=torch.long).view(-1, block), torch.tensor(masks).view(-1, block), skipped


def split_held_out(ids, masks, n_eval):
    """The first n_eval usable rows are held out; training rows that repeat a held-out row (the same
    ids: a dataset's duplicates) are dropped too, so no held-out answer is ever trained on. Returns
    (eval ids, eval masks, train ids, train masks, training rows dropped as duplicates)."""
    held = {tuple(r.tolist()) for r in ids[:n_eval]}
    keep = torch.tensor([tuple(r.tolist()) not in held for r in ids[n_eval:]], dtype=torch.bool)
    train_ids, train_masks = ids[n_eval:][keep], masks[n_eval:][keep]
    return ids[:n_eval], masks[:n_eval], train_ids, train_masks, int((~keep).sum())


def load_rows(cfg):
    """The SFT rows: a local jsonl (--data) or the Hub dataset, each a dict with `messages`."""
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)      # we report a bad file ourselves
    datasets.disable_progress_bars()
    if cfg.data:
        if not os.path.exists(cfg.data):
            raise UserError(f"--data {cfg.data} does not exist")
        check_utf8(cfg.data, "--data")
        try:
            return datasets.load_dataset("json", data_files=[cfg.data], split="train")
        except Exception as e:
            raise UserError(f"could not read --data {cfg.data} as jsonl ({type(e).__name__})") from None
    try:
        return datasets.load_dataset(cfg.dataset, split="train")
    except Exception as e:
        raise UserError(f"could not load {cfg.dataset} from the Hub ({type(e).__name__}); offline, pass --data "
                               f"with a local jsonl of rows with `messages`") from None


class Rows:
    """The global batch of step s is rows s*B .. (s+1)*B - 1 of an endless sequence of epochs, each a
    permutation of the training rows seeded by (seed, epoch); slot j takes its micro_batch of them.
    Same rows and masks at any world size; its state is only its mask generator (the step is saved)."""

    def __init__(self, ids, masks, index, cfg, device):
        self.ids, self.masks, self.index, self.cfg = ids, masks, index, cfg
        self.gen = torch.Generator(device).manual_seed(cfg.seed * SLOT_SEED_STRIDE + index)
        self.epoch, self.perm = None, None

    def order(self, epoch):
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * EPOCH_SEED_STRIDE + epoch)
            self.epoch, self.perm = epoch, torch.randperm(len(self.ids), generator=g)
        return self.perm

    def batch(self, step):
        n, m = len(self.ids), self.cfg.micro_batch
        at = torch.arange(m) + step * self.cfg.batch_size + self.index * m
        rows = torch.stack([self.order(int(e))[r] for e, r in zip(at // n, at % n)])
        return self.ids[rows], self.masks[rows]

    def load_state_dict(self, s):
        self.gen.set_state(s["gen"])


class Slots:
    """This rank's data slots: slot j (rank + k x world) is the j-th micro-batch of every step's
    global batch, so the rows and masks of a step are the same at any world size. A checkpoint
    keeps every slot's mask generator (the rows follow from the step)."""

    def __init__(self, ids, masks, cfg, world):
        n_slots = cfg.batch_size // cfg.micro_batch
        self.world, self.n_slots = world, n_slots
        self.rows = {i: Rows(ids, masks, i, cfg, world.device) for i in range(world.rank, n_slots, world.size)}

    def start(self, first):
        self.step = first

    def next(self):
        """[(rows, answer masks, the generator of their masks)] of this rank's slots at the next step."""
        self.step += 1
        return [(*r.batch(self.step - 1), r.gen) for _, r in sorted(self.rows.items())]

    def state_dict(self):
        mine = {i: {"gen": r.gen.get_state()} for i, r in self.rows.items()}
        return {i: s for part in distributed.gather(mine, self.world) for i, s in part.items()}

    def load_state_dict(self, states):
        if len(states) != self.n_slots:
            raise UserError(f"the checkpoint has {len(states)} data slots, this run {self.n_slots} (batch / "
                            f"micro-batch); resume with the same --batch-size and --micro-batch")
        for i, r in self.rows.items():
            r.load_state_dict(states[i])


def describe_bad_rows(skipped):
    return "; ".join(f"{count} with {why} (first: row {first})" for why, (first, count) in skipped.items())



# ----------------------------------------------------------------------------- output folder and figure

def default_out_dir(cfg, preset):
    """out/sft/<preset>_U<t0>-<t1>_s<seed>: each interval of Tables 2-3 in a folder of its own."""
    return os.path.join("out", "sft", f"{preset}_U{cfg.t0:g}-{cfg.t1:g}_s{cfg.seed}")


def plot_runs(run_dirs, path):
    """The held-out answer NLL of finished SFT runs against the step."""
    fsdp.plot_runs(run_dirs, SCRIPT, path, "SFT: held-out answer NLL", "held-out answer NLL (full-range bound, "
                                                                        "nats/token)")




# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    """(flags, settings): the preset's settings, then every flag given."""
    p = fsdp.parser(__doc__.split("\n\n")[0] + " See README 'Fine-tuning'.", PRESETS, "t0-1", None, None)
    data = p.add_argument_group("model and data")
    data.add_argument("--init", help="Hub id or LLaDA-format folder (a pretrain_8b.py export too); '' = from scratch")
    data.add_argument("--model", help="model.py preset when --init is ''")
    data.add_argument("--dataset", help="Hub dataset with a `messages` column (--data reads a local jsonl instead)")
    data.add_argument("--data", help="local jsonl of rows with `messages` (no download)")
    data.add_argument("--tokenizer", help="tokenizer.json or a folder holding one (default: --init's; bytes from "
                                          "scratch)")
    data.add_argument("--eval-rows", type=int, help="the first usable rows, held out: their answers' full-range bound")
    plan.add_flags(p)
    return cli.parse(p, argv, SFTConfig, PRESETS)


def main(argv=None):
    a, cfg = parse_args(argv)
    plan_only = (a.dry_run, "with --dry-run")
    cli.check_used(a, world_size=plan_only, plan_mfu=plan_only, trace=plan_only,
                   allow_change=(a.resume, "with --resume"))
    if a.plot_runs:
        path = os.path.join(a.out_dir or "out/sft_runs", "heldout_nll_runs.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot_runs(a.plot_runs, path)
        print(f"wrote {path}")
        return
    if a.dry_run:
        plan.dry_run(cfg, a, paper_hours=6 if cfg.init == llada.LLADA else None, model_cfg=llada.planned_config(cfg.init))
        return
    device = cli.pick_device(a.device)
    compile_model = device.startswith("cuda") if a.compile is None else a.compile    # on by default on GPUs
    out_dir = a.out_dir or default_out_dir(cfg, a.preset)
    summary = train(cfg, out_dir, device=device, resume=a.resume, compile_model=compile_model, export_dir=a.export,
                    plot=a.plot, allow_change=a.allow_change, timeout_s=a.dist_timeout)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not summary.get("done"):
        print(f"SFT {describe(cfg)}: held-out answer NLL {summary['test_loss']:.4f} nats/token after "
              f"{summary['steps']} steps ({summary['seconds']:.0f}s); wrote {out_dir}/summary.json, {summary['export']}")


if __name__ == "__main__":
    cli.run_cli(main)
