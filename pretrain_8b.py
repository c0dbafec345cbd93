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

The machinery (torchrun, FSDP2, the loop, DCP checkpoints, export, the plan) is fsdp.py's; this
file is §5.2.1: Table 4's settings, DCLM into data slots, the held-out set, and main.
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import common
import fsdp
import model as model_lib
import plan

DCLM = "mlfoundations/dclm-baseline-1.0"


@dataclass
class PretrainConfig:
    model: str = "llada-8b"           # a model.py preset
    dataset: str = DCLM               # Hub dataset, streamed; --data reads local files instead
    data: str = ""                    # local file or folder: .txt/.raw (a document per line), .jsonl/.json (also .zstd/.gz, DCLM's layout) or .parquet
    text_field: str = "text"          # the column of --data / --dataset holding the document text
    tokenizer: str = fsdp.LLADA            # Hub id, tokenizer.json or a folder holding one; "" = bytes
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


# ----------------------------------------------------------------------------- data

DATA_SUFFIXES = {".txt": "text", ".raw": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSED = (".zstd", ".zst", ".gz")    # `datasets` decompresses these by their suffix (zstd needs zstandard)
ENCODE_BATCH = 16                        # documents tokenised together (tokenizers' encode_batch frees the GIL)


def data_kind(name):
    """The `datasets` builder of a data file, by its name: DCLM's *.jsonl.zstd is compressed jsonl."""
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return DATA_SUFFIXES.get(os.path.splitext(name)[1])


def local_files(path):
    """The data files of --data: one file, or every data file under a folder (DCLM's layout
    global-shard_*/local-shard_*/*.jsonl.zstd included), sorted, all of one kind."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if data_kind(f) and not f.startswith("."))
        if not files:
            raise common.UserError(f"--data {path} holds no .txt/.raw, .jsonl/.json or .parquet file (compressed "
                                   f"{'/'.join(COMPRESSED)} included)")
    elif os.path.exists(path):
        files = [path]
    else:
        raise common.UserError(f"--data {path} does not exist")
    kinds = {data_kind(os.path.basename(f)) for f in files}
    if None in kinds or len(kinds) > 1:
        raise common.UserError(f"--data {path}: want .txt/.raw, .jsonl/.json or .parquet files (compressed "
                               f"{'/'.join(COMPRESSED)} too), one kind, got {sorted({os.path.basename(f) for f in files})[:4]}")
    for f in files:
        try:
            with open(f, "rb"):
                pass                 # unreadable: one line now, not deep inside `datasets`
        except OSError as e:
            raise common.UserError(f"--data {f} cannot be read ({e.strerror})") from None
        if os.path.getsize(f) == 0:
            raise common.UserError(f"--data {f} is empty")
    if any(f.endswith((".zstd", ".zst")) for f in files):
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise common.UserError("--data holds zstd files; pip install zstandard (requirements.txt)") from None
    return kinds.pop(), files


def hub_files(dataset):
    """The data files of a Hub dataset repository (DCLM: ~27.9k *.jsonl.zstd), as hf:// paths, sorted."""
    from huggingface_hub import HfApi
    try:
        names = HfApi().list_repo_files(dataset, repo_type="dataset")
    except Exception as e:
        raise common.UserError(f"could not list {dataset} on the Hub ({type(e).__name__}); offline, pass --data "
                               f"with local files") from None
    files = sorted(f"hf://datasets/{dataset}/{n}" for n in names if data_kind(n) and "/." not in "/" + n)
    if not files:
        raise common.UserError(f"{dataset} on the Hub holds no data file this script reads")
    return data_kind(files[0]), files


def data_files(cfg):
    """(builder, files in the run's order, fingerprint), listed by rank 0 alone and sent to every rank
    (DCLM's listing is ~27.9k names). The order is shuffled with --seed (the same on any world size):
    sorted, the data slots would read only the first files of the listing, one global shard of DCLM.
    The fingerprint (names, sizes, modification times) lets --resume refuse changed data."""
    import hashlib
    import random

    def listing():
        if common.rank() != 0:
            return None
        builder, files = local_files(cfg.data) if cfg.data else hub_files(cfg.dataset)
        stats = [(os.path.relpath(f, cfg.data) if os.path.isdir(cfg.data) else f, *file_stat(f)) for f in files] \
            if cfg.data else files
        random.Random(cfg.seed).shuffle(files)
        return builder, files, hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]
    return common.broadcast(common.on_every_rank(listing))


def file_stat(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def open_documents(builder, files):
    """The document stream over `files` in this order, a `datasets` IterableDataset read lazily."""
    import datasets
    from datasets import load_dataset
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)    # we report a bad file ourselves, in one line
    try:
        return load_dataset(builder, data_files=files, split="train", streaming=True)
    except Exception as e:   # `datasets` infers the columns from the first rows: a malformed start
        raise common.UserError(f"could not read the data ({files[0]}, ...: {type(e).__name__})") from None


def doc_key(text):
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def count(skipped, why, row=None):
    skipped[why] = skipped.get(why, 0) + 1
    if row is not None:
        skipped.setdefault("fields seen", sorted(row))


def documents(rows, cfg, where, skipped):
    """The text of each row. Rows without the text field, whose field is not text (a number, a
    list, a dict: never str()-ed into training data) and empty documents are skipped and counted
    in `skipped` (reported at the end, never dropped silently); a file that cannot be parsed is a
    one-line error naming it."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:     # pyarrow / json errors inside `datasets`: the user's file
            raise common.UserError(f"could not read {where} ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:120]})") from None
        text = row.get(cfg.text_field)
        if text is None:           # absent (jsonl fills a missing field with None)
            count(skipped, f"no {cfg.text_field!r} field", row)
        elif not isinstance(text, str):
            count(skipped, f"{cfg.text_field!r} not text ({type(text).__name__})", row)
        elif not text.strip():
            count(skipped, "empty")
        else:
            yield text


def slot_stream(ds, index, n_slots):
    """Slot `index`'s share of the stream, every document read by one slot only. With at least as
    many files as slots, whole files are dealt out (slot j reads files j, j + n_slots, ... of the
    run's shuffled order; some slots get one more): each slot streams only its own.
    split_dataset_by_node would do this only when the file count is a multiple of n_slots (DCLM's
    is not) and otherwise make every slot read every file and keep one row in n_slots. With fewer
    files than slots, rows are dealt out so."""
    from datasets.distributed import split_dataset_by_node
    if ds.num_shards >= n_slots:
        return ds.shard(n_slots, index, contiguous=False)
    return split_dataset_by_node(ds, rank=index, world_size=n_slots)


class Slot:
    """The token stream behind one micro-batch position of the global batch: the documents of its
    slot_stream, joined with EOS and cut into block_size blocks, plus the generator of its masks.
    A rank owns batch_size / (micro_batch * world) slots, so the global batch and its masks are
    the same whatever the world size. Its state (stream position, leftover tokens, generator) is
    a small dict, saved with checkpoints."""

    def __init__(self, ds, index, n_slots, tok, eos, cfg, held_out, device, where):
        self.ds = slot_stream(ds, index, n_slots)
        self.tok, self.eos, self.cfg, self.held_out, self.where = tok, eos, cfg, held_out, where
        self.buffer, self.epoch, self.docs, self.it, self.skipped = [], 0, 0, None, {}
        self.gen = torch.Generator(device).manual_seed(cfg.seed * fsdp.SLOT_SEED_STRIDE + index)

    def next_doc(self):
        while True:
            if self.it is None:
                self.ds.set_epoch(self.epoch)
                self.it = documents(self.ds, self.cfg, self.where, self.skipped if self.epoch == 0 else {})
            for text in self.it:
                if doc_key(text) not in self.held_out:
                    self.docs += 1
                    return text
            if self.docs == 0:
                raise common.UserError(
                    f"{self.where}: a data slot found no training document (all held out, or fewer documents than "
                    f"the {self.cfg.batch_size // self.cfg.micro_batch} slots"
                    + (f"; skipped rows: {describe_skipped(self.skipped)}" if self.skipped else "") + ")")
            self.it, self.epoch = None, self.epoch + 1      # a pass is over: the next epoch, from the start

    def next_batch(self, n):
        """n blocks of block_size tokens, (n, block_size) int64 on the CPU. Documents are tokenised
        ENCODE_BATCH at a time (on the prefetch thread: encode_batch releases the GIL, so the
        training loop runs meanwhile); their tokens wait in the buffer, which a checkpoint saves."""
        need = n * self.cfg.block_size
        while len(self.buffer) < need:
            docs = [self.next_doc() for _ in range(ENCODE_BATCH)]
            for enc in self.tok.encode_batch(docs, add_special_tokens=False):
                self.buffer += enc.ids + [self.eos]
        out, self.buffer = self.buffer[:need], self.buffer[need:]
        return torch.tensor(out, dtype=torch.long).view(n, self.cfg.block_size)

    def data_state(self):
        """Where the stream stands (taken right after a batch, on the prefetch thread)."""
        import copy
        return dict(ds=copy.deepcopy(self.ds.state_dict()), buffer=list(self.buffer), epoch=self.epoch,
                    docs=self.docs, skipped=dict(self.skipped))

    def load_state_dict(self, s):
        self.ds.load_state_dict(s["ds"])
        self.buffer, self.epoch, self.docs, self.it = list(s["buffer"]), s["epoch"], s["docs"], None
        self.skipped = dict(s.get("skipped", {}))
        self.gen.set_state(s["gen"])


def held_out_set(ds, tok, eos, cfg, where):
    """The first eval_docs documents of the stream, packed into eval_seqs sequences, and their keys
    (training skips any document with one of them)."""
    skipped = {}
    docs = list(documents(ds.take(cfg.eval_docs), cfg, where, skipped))
    if not docs:
        raise common.UserError(f"{where}: no document with text among the first {cfg.eval_docs} rows"
                               + (f" (skipped: {describe_skipped(skipped)}; pass --text-field?)" if skipped else
                                  " (empty file?)"))
    tokens = [t for enc in tok.encode_batch(docs, add_special_tokens=False) for t in enc.ids + [eos]]
    n = min(cfg.eval_seqs, len(tokens) // cfg.block_size)
    if n == 0:
        raise common.UserError(f"{where}: the {len(docs)} held-out documents hold {len(tokens)} tokens, fewer than "
                               f"one block of {cfg.block_size}; more data, or a larger --eval-docs")
    seqs = torch.tensor(tokens[: n * cfg.block_size], dtype=torch.long).view(n, cfg.block_size)
    return seqs, {doc_key(t) for t in docs}, skipped


def describe_skipped(skipped):
    fields = skipped.get("fields seen")
    return "; ".join(f"{n} {why}" for why, n in skipped.items() if why != "fields seen") + \
        (f" (a row's fields: {fields})" if fields else "")


def skipped_rows(slots):
    """Rows the slots skipped, summed over the ranks: the slots split the stream, held-out rows
    included, so each row read is counted once."""
    mine = [s.skipped for s in slots.values()]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine, group=common.CONTROL)
    total = {}
    for d in (d for part in parts for d in part):
        for why, n in d.items():
            total[why] = n if why == "fields seen" else total.get(why, 0) + n
    return total


def data_source(cfg):
    return cfg.data or f"{cfg.dataset} (Hub, streamed)"


# ----------------------------------------------------------------------------- model

SCRIPT = "pretrain_8b.py"


def sequence_length(step, cfg):
    """LLaDA: with probability random_length_prob a step trains on a length uniform on [1, block],
    drawn from a generator seeded by the step, so every rank crops to the same length."""
    g = torch.Generator().manual_seed(cfg.seed * fsdp.SLOT_SEED_STRIDE + step)
    if torch.rand((), generator=g).item() < cfg.random_length_prob:
        return int(torch.randint(1, cfg.block_size + 1, (), generator=g))
    return cfg.block_size


def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, export_dir=None, plot=False,
          allow_change=(), timeout_s=600.0):
    """One pre-training run under torchrun (or as a world of one). Writes OUT_DIR/{run.json, step_*/,
    log.jsonl, summary.json, export/}; returns the summary on rank 0 (None elsewhere), or "done" when
    OUT_DIR holds this very run, finished."""
    rank, world, device = fsdp.setup(device, timeout_s)
    fsdp.check_config(cfg, world)
    if fsdp.prepare_run(SCRIPT, out_dir, export_dir, resume, asdict(cfg), rank, allow_change) == "done":
        return "done"
    tok = common.on_every_rank(fsdp.load_tokenizer, cfg.tokenizer)
    ids = fsdp.token_ids(tok, model_lib.get_config(cfg.model))
    model_cfg = fsdp.model_config(cfg.model, ids, block_size=cfg.block_size)
    builder, files, data_id = data_files(cfg)
    ds = common.on_every_rank(open_documents, builder, files)
    where = data_source(cfg)
    eval_seqs, held_out, _ = common.on_every_rank(held_out_set, ds, tok, ids["eos"], cfg, where)
    n_slots = cfg.batch_size // cfg.micro_batch
    slots = {i: Slot(ds, i, n_slots, tok, ids["eos"], cfg, held_out, device, where)
             for i in range(rank, n_slots, world)}                 # micro-step k uses slot rank + k * world
    model, opt = fsdp.build(model_cfg, cfg, device, compile_model, plan.choose_ac(cfg, world, device, model_cfg))
    latest = fsdp.latest_checkpoint(out_dir) if resume else None
    run = fsdp.resume_from(latest, model, opt, slots, n_slots, cfg, data_id, allow_change)
    if rank == 0:
        common.mark_run(out_dir, SCRIPT, asdict(cfg))
    log = fsdp.Logger(out_dir, rank == 0)
    log(fsdp.resumed(latest, run) if latest else
        f"{fsdp.describe(cfg)}: {model.num_params():,} parameters ({cfg.model}), batch {cfg.batch_size} x "
        f"{cfg.block_size} ({n_slots // world} x {cfg.micro_batch} x {world} GPUs), {cfg.max_steps} steps on "
        f"{device}; data {where} ({len(files):,} files, in an order shuffled by --seed); {len(eval_seqs)} held-out "
        f"sequences", **({"resumed": run["step"]} if latest else {}))

    def batches(step):     # LLaDA's random length crops every sequence of the step alike
        L = sequence_length(step, cfg)
        return [(slots[i].next_batch(cfg.micro_batch)[:, :L], None) for i in sorted(slots)]
    evaluate = lambda: fsdp.heldout_nll(model, eval_seqs, cfg, device)
    run = fsdp.train_loop(cfg, model, opt, slots, batches, evaluate, out_dir, device, fsdp.loss_ce(compile_model),
                          log, run)
    skipped = skipped_rows(slots)
    if skipped:
        log(f"skipped rows of {where}: {describe_skipped(skipped)}", skipped=skipped)
    return fsdp.finish(SCRIPT, cfg, model, out_dir, export_dir, tok, ids, run, plot, skipped_rows=skipped)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See README 'Pre-training'.")
    fsdp.add_run_args(p, PretrainConfig, "fig4_heldout_nll.png", presets=PRESETS, preset="llada-8b", t0=0.0, t1=1.0)
    p.add_argument("--benchmark", action="store_true", help="time full-width training steps (see --bench-layers)")
    p.add_argument("--bench-layers", type=int, default=4, help="--benchmark: blocks (0: the preset's) (%(default)s)")
    p.add_argument("--bench-steps", type=int, default=10, help="--benchmark: timed steps (%(default)s)")
    p.add_argument("--bench-trace", action="store_true", help="--benchmark: also trace the same step on fake tensors, "
                                                              "for the traced peak memory beside the measured one")
    return p.parse_args(argv)


def default_out_dir(cfg, preset):
    """out/pretrain/<preset>_U<t0>-<t1>_s<seed>: the README's two runs land in folders of their own."""
    return os.path.join("out", "pretrain", common.run_name(preset, common.interval_name(cfg.t0, cfg.t1),
                                                           f"s{cfg.seed}"))


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = common.config_from_args(a, PretrainConfig, PRESETS)
    common.check_interval(cfg.t0, cfg.t1)
    if a.plot_runs:
        return fsdp.plot_runs_cli(a)
    fsdp.check_plan_args(a)
    if a.dry_run:
        world = a.world_size or int(os.environ.get("WORLD_SIZE", "8"))
        fsdp.check_config(cfg, world)
        plan.plan(cfg, world, a.plan_mfu, paper_hours=20 if cfg.model == "llada-8b" else None, traced=a.trace)
        return
    device = common.pick_device(a.device)
    compile_model = device.startswith("cuda") if a.compile is None else a.compile    # on by default on GPUs
    if a.benchmark:
        try:
            out = plan.benchmark(cfg, device, compile_model, a.bench_layers, a.bench_steps, timeout_s=a.dist_timeout,
                                 traced=a.bench_trace)
            if common.rank() == 0:
                bench_dir = a.out_dir or os.path.join("out", "pretrain", f"benchmark_{a.preset}")
                common.prepare_out_dir(bench_dir)
                common.write_json(os.path.join(bench_dir, "benchmark.json"), out)
        finally:
            fsdp.teardown()
        return
    out_dir = a.out_dir or default_out_dir(cfg, a.preset)
    fsdp.run_training(train, cfg, a, out_dir, device, compile_model, lambda s: (
        f"{fsdp.describe(cfg)}: held-out NLL {s['test_loss']:.4f} nats/token after {s['steps']} steps "
        f"({s['tokens']:,} tokens, {s['seconds']:.0f}s)"))


if __name__ == "__main__":
    common.run_cli(main)
