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
to stop; the loss is normalised per row by its answer length (LLaDA Eq. 5).

Distributed setup, FSDP2, the training loop, checkpoints and export are pretrain_8b.py's.
"""
import argparse
import os
import sys
from dataclasses import dataclass, replace

import torch

import common
import masking
import model as model_lib
import fsdp

TULU = "allenai/tulu-3-sft-personas-math-filtered"


@dataclass
class SFTConfig:
    init: str = fsdp.LLADA              # Hub id or LLaDA-format folder (a pretrain_8b.py export too); "" = scratch
    model: str = "tiny"               # model.py preset when --init is ""
    dataset: str = TULU               # Hub dataset with a `messages` column; --data reads a local jsonl instead
    data: str = ""                    # local jsonl of rows with `messages` (no download)
    tokenizer: str = ""               # default: --init's tokenizer.json (bytes when training from scratch)
    block_size: int = 1024            # tokens per row: prompt, answer, EOS padding
    batch_size: int = 256             # rows per optimizer step, all GPUs together (Table 4)
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


# ----------------------------------------------------------------------------- chat format

def chat_ids(tok, messages):
    """LLaDA's chat template (its tokenizer_config.json): BOS, then per message
    <|start_header_id|>role<|end_header_id|>\\n\\n content.strip() <|eot_id|>. The prompt is every
    turn before the last assistant turn plus the assistant header; the answer is that turn's
    content and <|eot_id|>. Returns (prompt ids, answer ids); a malformed conversation raises
    ValueError saying how."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError("`messages` is not a list of {role, content}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant turn")
    turn = lambda m: f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{str(m['content']).strip()}<|eot_id|>"
    prompt = "<|startoftext|>" + "".join(turn(m) for m in messages[:last]) + \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    answer = str(messages[last]["content"]).strip() + "<|eot_id|>"
    p = tok.encode(prompt, add_special_tokens=False).ids
    whole = tok.encode(prompt + answer, add_special_tokens=False).ids
    return p, whole[len(p):]


def encode_rows(rows, tok, eos, block):
    """Every usable row as (ids, answer mask), both `block` long: prompt, answer, EOS padding (part of
    the answer). Malformed rows are skipped and counted by reason, with the first row of each reason."""
    ids, masks, skipped = [], [], {}
    for n, row in enumerate(rows):
        try:
            if row.get("messages") is None:
                raise ValueError("no `messages`")
            p, a = chat_ids(tok, row["messages"])
            if len(p) >= block:
                raise ValueError(f"prompt longer than the block of {block}")
            if len(p) + len(a) > block:
                raise ValueError(f"prompt and answer longer than the block of {block}")
        except ValueError as e:
            first, count = skipped.get(str(e), (n, 0))
            skipped[str(e)] = (first, count + 1)
            continue
        ids.append(p + a + [eos] * (block - len(p) - len(a)))
        masks.append([False] * len(p) + [True] * (block - len(p)))
    return torch.tensor(ids, dtype=torch.long).view(-1, block), torch.tensor(masks).view(-1, block), skipped


def load_rows(cfg):
    """The SFT rows: a local jsonl (--data) or the Hub dataset, each a dict with `messages`."""
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)      # we report a bad file ourselves
    datasets.disable_progress_bars()
    if cfg.data:
        if not os.path.exists(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data} does not exist")
        try:
            return datasets.load_dataset("json", data_files=[cfg.data], split="train")
        except Exception as e:
            raise ValueError(f"could not read --data {cfg.data} as jsonl ({type(e).__name__})") from None
    try:
        return datasets.load_dataset(cfg.dataset, split="train")
    except Exception as e:
        raise ValueError(f"could not load {cfg.dataset} from the Hub ({type(e).__name__}); offline, pass --data "
                         f"with a local jsonl of rows with `messages`") from None


class Rows:
    """The global batch of step s is rows s*B .. (s+1)*B - 1 of an endless sequence of epochs, each a
    permutation of the training rows seeded by (seed, epoch); slot j takes its micro_batch of them.
    Same rows and masks at any world size; its state is only its mask generator (the step is saved)."""

    def __init__(self, ids, masks, index, cfg, device):
        self.ids, self.masks, self.index, self.cfg = ids, masks, index, cfg
        self.gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + index)
        self.epoch, self.perm = None, None

    def order(self, epoch):
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self.epoch, self.perm = epoch, torch.randperm(len(self.ids), generator=g)
        return self.perm

    def batch(self, step):
        n, m = len(self.ids), self.cfg.micro_batch
        at = torch.arange(m) + step * self.cfg.batch_size + self.index * m
        rows = torch.stack([self.order(int(e))[r] for e, r in zip(at // n, at % n)])
        return self.ids[rows], self.masks[rows]

    def data_state(self):
        return {}                # the rows of a step follow from the step

    def load_state_dict(self, s):
        self.gen.set_state(s["gen"])


# ----------------------------------------------------------------------------- model

def init_config(cfg, ids):
    """The model to fine-tune: --init's config.json, or a model.py preset when training from scratch."""
    if not cfg.init:
        return fsdp.model_config(cfg.model, ids, block_size=cfg.block_size)
    import json
    folder = model_lib.checkpoint_folder(cfg.init, "--init")
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init {cfg.init}: no config.json in {folder}")
    with open(path) as f:
        mc = model_lib.config_from_json(json.load(f))
    if cfg.block_size > mc.block_size:
        raise ValueError(f"--block-size {cfg.block_size} exceeds --init's max_sequence_length {mc.block_size}")
    if ids["vocab"] > mc.vocab_size:
        raise ValueError(f"the tokenizer has {ids['vocab']:,} ids; the --init model only {mc.vocab_size:,}")
    masking.check_mask_id(ids["mask"], ids["vocab"], mc.vocab_size, ids["special"])
    return replace(mc, mask_id=ids["mask"])


def tokenizer_source(cfg):
    if cfg.tokenizer or not cfg.init:
        return cfg.tokenizer
    return model_lib.checkpoint_folder(cfg.init, "--init")


# ----------------------------------------------------------------------------- the run

def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, export_dir=None, plot=False,
          allow_change=()):
    """One SFT run under torchrun (or as a world of one); returns the summary on rank 0."""
    rank, world, device = fsdp.setup_distributed(device)
    fsdp.check_config(cfg, world)
    fsdp.prepare_run(out_dir, export_dir, resume, rank, device)
    tok = fsdp.on_every_rank(lambda: fsdp.load_tokenizer(tokenizer_source(cfg)), device)
    ids = fsdp.token_ids(tok)
    if ids["bos"] is None:
        raise ValueError("the tokenizer has no <|startoftext|> (BOS), which LLaDA's chat template starts with")
    model_cfg = fsdp.on_every_rank(init_config, device, cfg, ids)
    rows = fsdp.on_every_rank(load_rows, device, cfg)
    all_ids, all_masks, skipped = encode_rows(rows, tok, ids["eos"], cfg.block_size)
    if len(all_ids) <= cfg.eval_rows:
        raise ValueError(f"{cfg.data or cfg.dataset}: {len(all_ids)} usable rows, not more than the "
                         f"{cfg.eval_rows} held out (--eval-rows); skipped: {describe_skipped(skipped) or 'none'}")
    eval_ids, eval_masks = all_ids[:cfg.eval_rows], all_masks[:cfg.eval_rows]
    train_ids, train_masks = all_ids[cfg.eval_rows:], all_masks[cfg.eval_rows:]
    n_slots = cfg.batch_size // cfg.micro_batch
    slots = {i: Rows(train_ids, train_masks, i, cfg, device) for i in range(rank, n_slots, world)}
    model, opt = fsdp.build(model_cfg, cfg, device, compile_model, fsdp.choose_ac(cfg, world, device))
    if cfg.init:
        fsdp.on_every_rank(model_lib.load_safetensors, device, model, cfg.init)
    latest = fsdp.checkpoints(out_dir)[-1] if resume and fsdp.checkpoints(out_dir) else None
    run = fsdp.resume_from(latest, model, opt, slots, n_slots, device, cfg, allow_change)
    log = fsdp.Logger(out_dir, rank == 0)
    log(fsdp.resumed(latest, run) if latest else
        f"SFT {fsdp.describe(cfg)} from {cfg.init or 'scratch (' + cfg.model + ')'}: {model.num_params():,} parameters, "
        f"{len(train_ids):,} training rows ({len(eval_ids)} held out), batch {cfg.batch_size} x {cfg.block_size} "
        f"({n_slots // world} x {cfg.micro_batch} x {world} GPUs), {cfg.max_steps} steps on {device}")
    if skipped:
        log(f"skipped {sum(c for _, c in skipped.values())} malformed rows: {describe_skipped(skipped)}",
            skipped={k: c for k, (_, c) in skipped.items()})
    batches = lambda s: [slots[i].batch(s) for i in sorted(slots)]
    evaluate = lambda: fsdp.heldout_nll(model, eval_ids, cfg, device, maskable=eval_masks)
    run = fsdp.train_loop(cfg, model, opt, slots, batches, evaluate, out_dir, device, fsdp.loss_ce(compile_model),
                          log, run)
    return fsdp.finish(cfg, model, out_dir, export_dir, tok, ids, run, plot,
                       skipped_rows={k: c for k, (_, c) in skipped.items()})


def describe_skipped(skipped):
    return "; ".join(f"{count} with {why} (first: row {first})" for why, (first, count) in skipped.items())


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See README 'Fine-tuning'.")
    fsdp.add_run_args(p, SFTConfig, "heldout_nll_runs.png", presets=PRESETS, preset="t0-1", t0=None, t1=None,
                      out_dir="out/sft")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = common.config_from_args(a, SFTConfig, PRESETS)
    masking.check_interval(cfg.t0, cfg.t1)
    if a.plot_runs:
        return fsdp.plot_runs_cli(a)
    if a.dry_run:
        world = a.world_size or int(os.environ.get("WORLD_SIZE", "8"))
        fsdp.check_config(cfg, world)
        preset = "llada-8b" if cfg.init else cfg.model
        fsdp.plan(replace(cfg, model=preset), world, a.plan_mfu, paper_hours=6 if preset == "llada-8b" else None)
        return
    device = common.pick_device(a.device)
    compile_model = device.startswith("cuda") if a.compile is None else a.compile    # on by default on GPUs
    try:
        summary = train(cfg, a.out_dir, device=device, resume=a.resume, compile_model=compile_model,
                        export_dir=a.export, plot=a.plot, allow_change=a.allow_change)
        if summary:
            print(f"SFT {fsdp.describe(cfg)}: held-out answer NLL {summary['test_loss']:.4f} nats/token after "
                  f"{summary['steps']} steps ({summary['seconds']:.0f}s); wrote {a.out_dir}/summary.json, "
                  f"{a.export or os.path.join(a.out_dir, 'export')}")
    finally:
        fsdp.teardown()


if __name__ == "__main__":
    common.run_cli(main)
