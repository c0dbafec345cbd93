"""
Raw text as token ids, for wikitext.py and theory.py: WikiText's splits (local files, or the Hub by
name), tokenised once with GPT-2's BPE (tiktoken) or as raw bytes, and cached as a uint16 memmap
(nanoGPT's train.bin), keyed by the source's content and the tokenizer.
"""
import hashlib
import json
import os

import numpy as np

from machinery import files
from machinery.cli import UserError

WIKITEXT_HUB_NAMES = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}


# ----------------------------------------------------------------------------- tokenizers

def gpt2_tokenizer(tokenizer_file=None):
    """tiktoken's GPT-2 BPE (r50k_base: 50257 ids, <|endoftext|> = 50256). With tokenizer_file (a local
    gpt2.tiktoken rank file) nothing is downloaded."""
    import tiktoken
    if tokenizer_file is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:   # offline and not cached: say what to do instead
            raise UserError(f"could not fetch GPT-2's BPE ranks ({type(e).__name__}); "
                            f"pass --tokenizer-file with a local gpt2.tiktoken") from None
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    if not os.path.exists(tokenizer_file):
        raise UserError(f"tokenizer file {tokenizer_file} does not exist")
    try:
        ranks = load_tiktoken_bpe(tokenizer_file)
    except Exception as e:           # a folder, a binary, another format: the user's file
        raise UserError(f"{tokenizer_file} is not a tiktoken rank file ({type(e).__name__})") from None
    if len(ranks) != 50256:
        raise UserError(f"{tokenizer_file} has {len(ranks)} ranks; GPT-2's rank file has 50256")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


class Bytes:
    """Text as its UTF-8 bytes: ids 0-255, nothing to load (nanoGPT's shakespeare-char, in bytes)."""
    name, n_vocab = "bytes", 256

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def tokenizer(name, tokenizer_file=None):
    """"gpt2" (tiktoken's BPE; a local rank file when given) or "bytes"."""
    if name == "bytes":
        return Bytes()
    if name != "gpt2":
        raise UserError(f"--tokenizer must be gpt2 or bytes, got {name!r}")
    return gpt2_tokenizer(tokenizer_file or None)


# ----------------------------------------------------------------------------- WikiText splits

def local_split(folder, split):
    """The file of `folder` whose name contains `split` (wiki.test.raw, test.txt, ...): the first, sorted."""
    if not os.path.isdir(folder):
        raise UserError(f"--data {folder} is not a folder")
    names = [f for f in sorted(os.listdir(folder)) if split in f and f.endswith((".raw", ".txt"))]
    if not names:
        raise UserError(f"no *{split}*.raw or *{split}*.txt file in {folder}")
    return os.path.join(folder, names[0])


def source(data, dataset, split):
    """What a split is read from: the local file of --data, or the Hub dataset's split by name."""
    return local_split(data, split) if data else f"hub:{dataset}:{split}"


def hub_text(dataset, split):
    """Raw text of a Hub WikiText split (wikitext-103, wikitext-2 or a full config name such as
    wikitext-103-raw-v1); needs internet once, then `datasets` caches it."""
    from datasets import load_dataset
    name = WIKITEXT_HUB_NAMES.get(dataset, dataset)
    split = {"valid": "validation"}.get(split, split)
    try:
        rows = load_dataset("wikitext", name, split=split)
    except Exception as e:
        raise UserError(f"could not load wikitext/{name} [{split}] from the Hub ({type(e).__name__}); "
                        f"offline, pass local raw files instead") from None
    return "".join(rows["text"])


def read_source(src, what="--data file"):
    if src.startswith("hub:"):
        _, dataset, split = src.split(":")
        return hub_text(dataset, split)
    return files.read_text(src, what)


def cache_path(cache_dir, src, enc, tokenizer_file=None):
    """The token cache of a source, keyed by its content (files.fingerprint, or the Hub name) and the
    tokenizer: another folder of the same name, or a file edited in place, gets a cache of its own
    instead of another's tokens."""
    tok = files.fingerprint(tokenizer_file) if tokenizer_file else getattr(enc, "name", "gpt2")
    key = hashlib.sha1(json.dumps([files.fingerprint(src), tok]).encode()).hexdigest()[:16]
    name = os.path.basename(os.path.dirname(src)) if not src.startswith("hub:") else src.split(":")[1]
    split = os.path.basename(src) if not src.startswith("hub:") else src.split(":")[2]
    return os.path.join(cache_dir, f"{name}-{key}", f"{split}.bin")


def encode(text, enc):
    return np.array(enc.encode_ordinary(text), dtype=np.uint16)


def load_tokens(src, enc, cache_dir, tokenizer_file=None, what=None):
    """Token ids of a source as a uint16 memmap, tokenised once and cached (nanoGPT's train.bin).
    `what` names it in the error of an empty source ("test split of data/wikitext-2")."""
    path = cache_path(cache_dir, src, enc, tokenizer_file)
    if not os.path.exists(path):
        ids = encode(read_source(src), enc)
        if len(ids) == 0:
            raise UserError(f"the {what or src} holds no text")
        tmp = f"{path}.{os.getpid()}.tmp"   # one per process: under torchrun every rank may write the cache
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ids.tofile(tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"--cache-dir {cache_dir} cannot be written ({e.strerror or type(e).__name__})") from None
    return np.memmap(path, dtype=np.uint16, mode="r")


def corpus_ids(corpus, tokenizer_name, tokenizer_file=None):
    """Token ids of a local raw-text file, or of a Hub WikiText's train split (theory.py --corpus)."""
    if os.path.exists(corpus) or corpus.startswith((".", "/")) or corpus.endswith((".raw", ".txt")):
        text = files.read_text(corpus, "--corpus")
    else:
        text = hub_text(corpus, "train")
    return tokenizer(tokenizer_name, tokenizer_file).encode_ordinary(text)
