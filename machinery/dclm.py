"""
DCLM (or any local text) as pre-training data, streamed: the files listed once (rank 0) in an order
shuffled by --seed, the first documents held out for the held-out NLL, the rest dealt to data slots.
Slot j is the j-th micro-batch of every global batch: it reads its own share of the files, joins
documents with EOS, cuts blocks, and masks them with a generator of its own. A rank owns
batch_size / (micro_batch x world) slots, so the global batch and its masks are the same at any world
size, and a slot's position is a small dict saved with each checkpoint.
"""
import hashlib
import os
import random

import torch

from machinery import distributed, files as file_ids
from machinery.cli import UserError

SLOT_SEED_STRIDE = 1_000_003    # slot i of a run seeded s draws its masks from generator s * stride + i


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
            raise UserError(f"--data {path} holds no .txt/.raw, .jsonl/.json or .parquet file (compressed "
                                   f"{'/'.join(COMPRESSED)} included)")
    elif os.path.exists(path):
        files = [path]
    else:
        raise UserError(f"--data {path} does not exist")
    kinds = {data_kind(os.path.basename(f)) for f in files}
    if None in kinds or len(kinds) > 1:
        raise UserError(f"--data {path}: want .txt/.raw, .jsonl/.json or .parquet files (compressed "
                               f"{'/'.join(COMPRESSED)} too), one kind, got {sorted({os.path.basename(f) for f in files})[:4]}")
    for f in files:
        try:
            with open(f, "rb"):
                pass                 # unreadable: one line now, not deep inside `datasets`
        except OSError as e:
            raise UserError(f"--data {f} cannot be read ({e.strerror})") from None
        if os.path.getsize(f) == 0:
            raise UserError(f"--data {f} is empty")
        if not f.endswith(COMPRESSED) and data_kind(f) in ("text", "json"):
            file_ids.check_utf8(f, "--data")     # one line naming the line, not a decoder's byte position later
    if any(f.endswith((".zstd", ".zst")) for f in files):
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise UserError("--data holds zstd files; pip install zstandard (requirements.txt)") from None
    return kinds.pop(), files


def hub_files(dataset):
    """The data files of a Hub dataset repository (DCLM: ~27.9k *.jsonl.zstd), as hf:// paths, sorted."""
    from huggingface_hub import HfApi
    try:
        names = HfApi().list_repo_files(dataset, repo_type="dataset")
    except Exception as e:
        raise UserError(f"could not list {dataset} on the Hub ({type(e).__name__}); offline, pass --data "
                               f"with local files") from None
    files = sorted(f"hf://datasets/{dataset}/{n}" for n in names if data_kind(n) and "/." not in "/" + n)
    if not files:
        raise UserError(f"{dataset} on the Hub holds no data file this script reads")
    return data_kind(files[0]), files

def listing(cfg):
    """(builder, files in the run's order): local --data files or the Hub dataset's, shuffled with --seed
    (the same on any world size; sorted, the data slots would read only the first files of the
    listing, one global shard of DCLM). Rank 0 lists (DCLM's listing is ~27.9k names): call it through
    run.rank0."""
    builder, files = local_files(cfg.data) if cfg.data else hub_files(cfg.dataset)
    random.Random(cfg.seed).shuffle(files)
    return builder, files


def fingerprint(cfg):
    """What identifies the data (Run's inputs): every local file's relative name, size and modification
    time (not its bytes: DCLM is terabytes), or the Hub listing's names."""
    if not cfg.data:
        return file_ids.fingerprint(hub_files(cfg.dataset)[1])
    return file_ids.fingerprint(cfg.data if os.path.isdir(cfg.data) else [cfg.data], content=False)


def open_documents(builder, files):
    """The document stream over `files` in this order, a `datasets` IterableDataset read lazily."""
    import datasets
    from datasets import load_dataset
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)    # we report a bad file ourselves, in one line
    try:
        return load_dataset(builder, data_files=files, split="train", streaming=True)
    except Exception as e:   # `datasets` infers the columns from the first rows: a malformed start
        raise UserError(f"could not read the data ({files[0]}, ...: {type(e).__name__})") from None


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
            raise UserError(f"could not read {where} ({type(e).__name__}: "
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
        self.gen = torch.Generator(device).manual_seed(cfg.seed * SLOT_SEED_STRIDE + index)

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
                raise UserError(
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
        raise UserError(f"{where}: no document with text among the first {cfg.eval_docs} rows"
                               + (f" (skipped: {describe_skipped(skipped)}; pass --text-field?)" if skipped else
                                  " (empty file?)"))
    tokens = [t for enc in tok.encode_batch(docs, add_special_tokens=False) for t in enc.ids + [eos]]
    n = min(cfg.eval_seqs, len(tokens) // cfg.block_size)
    if n == 0:
        raise UserError(f"{where}: the {len(docs)} held-out documents hold {len(tokens)} tokens, fewer than "
                               f"one block of {cfg.block_size}; more data, or a larger --eval-docs")
    seqs = torch.tensor(tokens[: n * cfg.block_size], dtype=torch.long).view(n, cfg.block_size)
    return seqs, {doc_key(t) for t in docs}, skipped


def describe_skipped(skipped):
    fields = skipped.get("fields seen")
    return "; ".join(f"{n} {why}" for why, n in skipped.items() if why != "fields seen") + \
        (f" (a row's fields: {fields})" if fields else "")


def open_data(cfg, tok, eos, run):
    """The pre-training data of this rank: the files listed by rank 0 in the run's order, the first
    eval_docs documents held out (packed into eval_seqs sequences), the rest dealt to this rank's data
    slots. Returns (held-out sequences, Slots)."""
    builder, files = run.rank0(lambda: listing(cfg))
    where = cfg.data or f"{cfg.dataset} (Hub, streamed)"
    with run.together():
        docs = open_documents(builder, files)
        held_out_seqs, held_out, _ = held_out_set(docs, tok, eos, cfg, where)
        slots = Slots(docs, tok, eos, cfg, held_out, run.world, where)
    slots.files = len(files)
    return held_out_seqs, slots


class Prefetch:
    """The next step's micro-batches drawn on a background thread while this step computes, so that
    streaming and tokenising overlap the GPU. Each batch comes with the slots' data position after
    it (a checkpoint saves that one, not the position after the batch drawn ahead). No collective
    runs on the thread: a failure travels with the batch to the main thread, where every rank
    agrees on it."""

    def __init__(self, batches, slots, first, stop, world):
        import queue
        import threading
        self.world, self.queue = world, queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self.fill, args=(batches, slots, first, stop), daemon=True)
        self.thread.start()

    def fill(self, batches, slots, first, stop):
        try:
            for step in range(first, stop):
                self.queue.put((batches(step), {i: s.data_state() for i, s in slots.items()}, None))
        except Exception as e:       # to the main thread (which would otherwise wait for ever)
            self.queue.put((None, None, e))

    def next(self):
        micro, positions, error = self.queue.get()
        distributed.agree(None if error is None else distributed.failure_of(error), self.world.control)
        if error is not None:
            raise error              # a world of one: the thread's exception itself
        return micro, positions


class Slots:
    """This rank's data slots (micro-step k of a step uses slot rank + k * world), their batches drawn
    one step ahead on a thread (Prefetch), and their state for a checkpoint."""

    def __init__(self, docs, tok, eos, cfg, held_out, world, where):
        n_slots = cfg.batch_size // cfg.micro_batch
        self.world, self.n_slots, self.cfg, self.where, self.files = world, n_slots, cfg, where, None
        self.slots = {i: Slot(docs, i, n_slots, tok, eos, cfg, held_out, world.device, where)
                      for i in range(world.rank, n_slots, world.size)}
        self.positions, self.feed = None, None

    def start(self, first, stop, length):
        """Draw the micro-batches of steps first .. stop - 1, each cropped to length(step) tokens (LLaDA's
        random length: the same on every rank, drawn from the step)."""
        def draw(step):
            n = length(step)
            return [s.next_batch(self.cfg.micro_batch)[:, :n] for _, s in sorted(self.slots.items())]
        self.feed = Prefetch(draw, self.slots, first, stop, self.world)

    def next(self):
        """This step's micro-batches, each with the generator that masks it: [(x0, generator)]."""
        micro, self.positions = self.feed.next()
        return list(zip(micro, (s.gen for _, s in sorted(self.slots.items()))))

    def state_dict(self):
        """Every slot's data position (as after the last step handed over) and mask generator, from
        every rank: the checkpoint's data state."""
        mine = {i: {**self.positions[i], "gen": s.gen.get_state()} for i, s in self.slots.items()}
        return {i: state for part in distributed.gather(mine, self.world) for i, state in part.items()}

    def load_state_dict(self, states):
        if len(states) != self.n_slots:
            raise UserError(f"the checkpoint has {len(states)} data slots, this run {self.n_slots} (batch / "
                            f"micro-batch); resume with the same --batch-size and --micro-batch")
        for i, slot in self.slots.items():
            slot.load_state_dict(states[i])

    def skipped(self):
        """Rows the slots skipped, summed over the ranks: the slots split the stream, held-out rows
        included, so each row read is counted once."""
        total = {}
        for d in (d for part in distributed.gather([s.skipped for s in self.slots.values()], self.world)
                  for d in part):
            for why, n in d.items():
                total[why] = n if why == "fields seen" else total.get(why, 0) + n
        return total
