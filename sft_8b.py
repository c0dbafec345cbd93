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

Distributed setup, FSDP2, the training loop, checkpoints and export are fsdp.py's (shared with
pretrain_8b.py); the plan and --ac auto are plan.py's.
"""
import argparse
import os
import sys
from dataclasses import asdict, dataclass, replace

import torch

import common
import fsdp
import masking
import model as model_lib
import plan

TULU = "allenai/tulu-3-sft-personas-math-filtered"


@dataclass
class SFTConfig:
    init: str = fsdp.LLADA              # Hub id or LLaDA-format folder (a pretrain_8b.py export too); "" = scratch
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


# ----------------------------------------------------------------------------- chat format

SCRIPT = "sft_8b.py"
EPOCH_SEED_STRIDE = 7919        # epoch e of a run seeded s orders its rows by generator s * stride + e


def content_text(content):
    """A message's text: a string, or the text parts of a list of parts ({"type": "text", "text": ...});
    anything else (null, a number, parts without text) raises ValueError saying what it is, so that
    it is never str()-ed into training data ("None", a list's repr)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                     for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"a message's content is {type(content).__name__ if content is not None else 'null'}, not text")


def chat_text(messages):
    """LLaDA's chat template (its tokenizer_config.json), as text: BOS, then per message
    <|start_header_id|>role<|end_header_id|>\\n\\n content.strip() <|eot_id|>. The prompt is every
    turn before the last assistant turn plus the assistant header; the answer is that turn's
    content and <|eot_id|>. Returns (prompt, answer); a malformed conversation raises ValueError
    saying how."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError("`messages` is not a list of {role, content}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant turn")
    turn = lambda m: f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{content_text(m['content']).strip()}<|eot_id|>"
    prompt = "<|startoftext|>" + "".join(turn(m) for m in messages[:last]) + \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return prompt, content_text(messages[last]["content"]).strip() + "<|eot_id|>"


def chat_ids(tok, messages):
    """(prompt ids, answer ids) of a conversation. Prompt and answer are encoded apart, so the
    boundary is exact: the prompt's ids are what the model is given at inference, the answer's what
    it must write after them (encoded together, a pre-tokenizer may merge across the boundary and
    shift the answer's mask by a token)."""
    prompt, answer = chat_text(messages)
    return tok.encode(prompt, add_special_tokens=False).ids, tok.encode(answer, add_special_tokens=False).ids


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
            texts.append((n, *chat_text(row["messages"])))
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
            raise common.UserError(f"--data {cfg.data} does not exist")
        try:
            return datasets.load_dataset("json", data_files=[cfg.data], split="train")
        except Exception as e:
            raise common.UserError(f"could not read --data {cfg.data} as jsonl ({type(e).__name__})") from None
    try:
        return datasets.load_dataset(cfg.dataset, split="train")
    except Exception as e:
        raise common.UserError(f"could not load {cfg.dataset} from the Hub ({type(e).__name__}); offline, pass --data "
                               f"with a local jsonl of rows with `messages`") from None


class Rows:
    """The global batch of step s is rows s*B .. (s+1)*B - 1 of an endless sequence of epochs, each a
    permutation of the training rows seeded by (seed, epoch); slot j takes its micro_batch of them.
    Same rows and masks at any world size; its state is only its mask generator (the step is saved)."""

    def __init__(self, ids, masks, index, cfg, device):
        self.ids, self.masks, self.index, self.cfg = ids, masks, index, cfg
        self.gen = torch.Generator(device).manual_seed(cfg.seed * fsdp.SLOT_SEED_STRIDE + index)
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

    def data_state(self):
        return {}                # the rows of a step follow from the step

    def load_state_dict(self, s):
        self.gen.set_state(s["gen"])


# ----------------------------------------------------------------------------- model

def init_config(cfg, ids):
    """The model to fine-tune: --init's config.json (every field checked), or a model.py preset when
    training from scratch."""
    if not cfg.init:
        return fsdp.model_config(cfg.model, ids, block_size=cfg.block_size)
    folder = init_folder(cfg.init)
    mc = fsdp.read_model_config(folder, "--init")
    if cfg.block_size > mc.block_size:
        raise common.UserError(f"--block-size {cfg.block_size} exceeds --init's max_sequence_length {mc.block_size}")
    if ids["vocab"] > mc.vocab_size:
        raise common.UserError(f"the tokenizer has {ids['vocab']:,} ids; the --init model only {mc.vocab_size:,}")
    with common.user_input():
        masking.check_mask_id(ids["mask"], ids["vocab"], mc.vocab_size, ids["special"])
    return replace(mc, mask_id=ids["mask"])


def init_folder(init):
    """--init as a local folder (a Hub id is downloaded); a name that is neither is one line."""
    with common.user_input():
        return model_lib.checkpoint_folder(init, "--init")


def tokenizer_source(cfg):
    if cfg.tokenizer or not cfg.init:
        return cfg.tokenizer
    return init_folder(cfg.init)


def planned_model(cfg):
    """--dry-run's model: --init's config.json (a local folder, or only that file from the Hub), or
    the preset's when training from scratch; LLaDA-8B-Base's architecture for its Hub id."""
    if not cfg.init:
        return None
    if cfg.init == fsdp.LLADA:
        return model_lib.get_config("llada-8b")
    if os.path.isdir(cfg.init):
        return fsdp.read_model_config(cfg.init, "--init")
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(cfg.init, "config.json")
    except Exception as e:
        raise common.UserError(f"--init {cfg.init}: no local folder, and its config.json could not be had from the "
                               f"Hub ({type(e).__name__})") from None
    return fsdp.read_model_config(os.path.dirname(path), "--init")


# ----------------------------------------------------------------------------- the run

def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, export_dir=None, plot=False,
          allow_change=(), timeout_s=600.0):
    """One SFT run under torchrun (or as a world of one); returns the summary on rank 0, or "done"
    when OUT_DIR holds this very run, finished."""
    rank, world, device = fsdp.setup(device, timeout_s)
    fsdp.check_config(cfg, world)
    if fsdp.prepare_run(SCRIPT, out_dir, export_dir, resume, asdict(cfg), rank, allow_change) == "done":
        return "done"
    tok = common.on_every_rank(lambda: fsdp.load_tokenizer(tokenizer_source(cfg)))
    common.on_every_rank(fsdp.chat_tokens, tok)
    ids = fsdp.token_ids(tok)
    if ids["bos"] is None:
        raise common.UserError("the tokenizer has no <|startoftext|> (BOS), which LLaDA's chat template starts with")
    model_cfg = common.on_every_rank(init_config, cfg, ids)
    rows = common.on_every_rank(load_rows, cfg)
    all_ids, all_masks, skipped = encode_rows(rows, tok, ids["eos"], cfg.block_size)
    if len(all_ids) <= cfg.eval_rows:
        raise common.UserError(f"{cfg.data or cfg.dataset}: {len(all_ids)} usable rows, not more than the "
                               f"{cfg.eval_rows} held out (--eval-rows); skipped: {describe_skipped(skipped) or 'none'}")
    eval_ids, eval_masks, train_ids, train_masks, duplicates = split_held_out(all_ids, all_masks, cfg.eval_rows)
    if len(train_ids) == 0:
        raise common.UserError(f"{cfg.data or cfg.dataset}: every training row repeats a held-out row")
    n_slots = cfg.batch_size // cfg.micro_batch
    slots = {i: Rows(train_ids, train_masks, i, cfg, device) for i in range(rank, n_slots, world)}
    model, opt = fsdp.build(model_cfg, cfg, device, compile_model, plan.choose_ac(cfg, world, device, model_cfg))
    if cfg.init:
        common.on_every_rank(lambda: load_init(model, cfg.init))
    latest = fsdp.latest_checkpoint(out_dir) if resume else None
    run = fsdp.resume_from(latest, model, opt, slots, n_slots, cfg, None, allow_change)
    if rank == 0:
        common.mark_run(out_dir, SCRIPT, asdict(cfg))
    log = fsdp.Logger(out_dir, rank == 0)
    log(fsdp.resumed(latest, run) if latest else
        f"SFT {fsdp.describe(cfg)} from {cfg.init or 'scratch (' + cfg.model + ')'}: {model.num_params():,} parameters, "
        f"{len(train_ids):,} training rows ({len(eval_ids)} held out" + (f", {duplicates} training rows repeating "
        f"them dropped" if duplicates else "") + f"), batch {cfg.batch_size} x {cfg.block_size} ({n_slots // world} x "
        f"{cfg.micro_batch} x {world} GPUs), {cfg.max_steps} steps on {device}", **({"resumed": run["step"]} if latest
                                                                                    else {}))
    if skipped:
        log(f"skipped {sum(c for _, c in skipped.values())} malformed rows: {describe_skipped(skipped)}",
            skipped={k: c for k, (_, c) in skipped.items()})
    batches = lambda s: [slots[i].batch(s) for i in sorted(slots)]
    evaluate = lambda: fsdp.heldout_nll(model, eval_ids, cfg, device, maskable=eval_masks)
    run = fsdp.train_loop(cfg, model, opt, slots, batches, evaluate, out_dir, device, fsdp.loss_ce(compile_model),
                          log, run)
    return fsdp.finish(SCRIPT, cfg, model, out_dir, export_dir, tok, ids, run, plot,
                       skipped_rows={k: c for k, (_, c) in skipped.items()}, held_out_duplicates_dropped=duplicates)


def load_init(model, init):
    """--init's weights into the sharded model; one that does not fit is one line."""
    with common.user_input():
        fsdp.load_sharded(model, init)


def describe_skipped(skipped):
    return "; ".join(f"{count} with {why} (first: row {first})" for why, (first, count) in skipped.items())


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See README 'Fine-tuning'.")
    fsdp.add_run_args(p, SFTConfig, "heldout_nll_runs.png", presets=PRESETS, preset="t0-1", t0=None, t1=None)
    return p.parse_args(argv)


def default_out_dir(cfg, preset):
    """out/sft/<preset>_U<t0>-<t1>_s<seed>: each interval of Tables 2-3 in a folder of its own."""
    return os.path.join("out", "sft", common.run_name(preset, common.interval_name(cfg.t0, cfg.t1), f"s{cfg.seed}"))


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = common.config_from_args(a, SFTConfig, PRESETS)
    common.check_interval(cfg.t0, cfg.t1)
    if a.plot_runs:
        return fsdp.plot_runs_cli(a)
    fsdp.check_plan_args(a)
    if a.dry_run:
        world = a.world_size or int(os.environ.get("WORLD_SIZE", "8"))
        fsdp.check_config(cfg, world)
        mc = planned_model(cfg)
        if mc is not None and cfg.block_size > mc.block_size:
            raise common.UserError(f"--block-size {cfg.block_size} exceeds --init's max_sequence_length {mc.block_size}")
        plan.plan(cfg, world, a.plan_mfu, paper_hours=6 if cfg.init == fsdp.LLADA else None, model_cfg=mc,
                  traced=a.trace)
        return
    device = common.pick_device(a.device)
    compile_model = device.startswith("cuda") if a.compile is None else a.compile    # on by default on GPUs
    out_dir = a.out_dir or default_out_dir(cfg, a.preset)
    fsdp.run_training(train, cfg, a, out_dir, device, compile_model, lambda s: (
        f"SFT {fsdp.describe(cfg)}: held-out answer NLL {s['test_loss']:.4f} nats/token after {s['steps']} steps "
        f"({s['seconds']:.0f}s)"))


if __name__ == "__main__":
    common.run_cli(main)
