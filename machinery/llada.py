"""
LLaDA's formats, in one place: its tokenizer (and a byte-level one built the same way for the small
presets) with the ids the model needs, its chat template, its config.json and its safetensors
checkpoints (sharded, "model."-prefixed keys), read from a local folder or the Hub. What
pretrain_8b.py exports, sft_8b.py --init and eval_8b.py --checkpoint load, in GSAI-ML/LLaDA-8B-Base's
own layout, so its weights load as they ship.
"""
import json
import os
from dataclasses import replace

import torch

import masking
import model as model_lib
from machinery import files
from machinery.cli import UserError, user_input

LLADA = "GSAI-ML/LLaDA-8B-Base"


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
        raise UserError(f"tokenizer {path} does not exist")
    try:
        return Tokenizer.from_file(path) if local else Tokenizer.from_pretrained(name)
    except Exception as e:      # offline, unknown Hub id, not a tokenizer.json
        raise UserError(f"could not load tokenizer {name!r} ({type(e).__name__}); pass --tokenizer with a "
                        f"local tokenizer.json, or '' for bytes") from None


def token_ids(tok, model_cfg=None):
    """EOS, MASK (and BOS when there is one) of a tokenizer, its vocabulary size (one past the
    largest id) and its special ids (which text never encodes to)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = dict(eos=tok.token_to_id("<|endoftext|>"), mask=tok.token_to_id("<|mdm_mask|>"),
               bos=tok.token_to_id("<|startoftext|>"), vocab=max(vocab.values()) + 1,
               special={i for i, t in tok.get_added_tokens_decoder().items() if t.special})
    if ids["eos"] is None:
        raise UserError("the tokenizer has no <|endoftext|> token to end documents with")
    if ids["mask"] is None:
        if model_cfg is None:
            raise UserError("the tokenizer has no <|mdm_mask|> token: add it as a special token (an id no "
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
        raise UserError("the tokenizer cannot write LLaDA's chat template: " + "; ".join(
            part for part in (f"no {', '.join(missing)} token" if missing else "",
                              f"{', '.join(split)} not encoded as one token" if split else "") if part)
                        + " (pass --tokenizer with LLaDA-8B-Instruct's tokenizer.json)")
    return {m: tok.token_to_id(m) for m in CHAT_MARKERS}


def model_config(preset, ids, **overrides):
    """The model preset, its vocabulary sized from the tokenizer where the preset is not LLaDA's
    (LLaDA keeps its padded 126,464), checked: every id fits, MASK is no real token."""
    with user_input():
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
        raise UserError(f"{flag} {folder}: no config.json")
    try:
        return config_from_json(files.read_json(path, f"{flag}'s"))
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- the chat template

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


def chat_template(messages, add_generation_prompt=True):
    """LLaDA's chat template (its tokenizer_config.json), as text: BOS, then per message
    <|start_header_id|>role<|end_header_id|>\\n\\n content.strip() <|eot_id|>, then (to be answered) the
    assistant's header."""
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{content_text(m['content']).strip()}<|eot_id|>"
                    for m in messages)
    return "<|startoftext|>" + turns + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt
                                        else "")


def chat_text(messages):
    """A conversation in the chat template, split where the answer starts: the prompt is every turn
    before the last assistant turn plus the assistant header; the answer is that turn's content and
    <|eot_id|>. Returns (prompt, answer). A conversation that cannot be trained as written raises
    ValueError saying how: malformed, no assistant turn, turns after the last one (they would be
    dropped), an empty answer."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError("`messages` is not a list of {role, content}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant turn")
    if last != len(messages) - 1:          # the turns after the answer would be dropped from what is trained
        raise ValueError("turns after the last assistant turn")
    answer = content_text(messages[last]["content"]).strip()
    if not answer:
        raise ValueError("an empty answer")
    return chat_template(messages[:last]), answer + "<|eot_id|>"


def chat_ids(tok, messages):
    """(prompt ids, answer ids) of a conversation. Prompt and answer are encoded apart, so the
    boundary is exact: the prompt's ids are what the model is given at inference, the answer's what
    it must write after them (encoded together, a pre-tokenizer may merge across the boundary and
    shift the answer's mask by a token)."""
    prompt, answer = chat_text(messages)
    return tok.encode(prompt, add_special_tokens=False).ids, tok.encode(answer, add_special_tokens=False).ids


def chat_tokenizer(tokenizer, init=""):
    """(tokenizer, ids) that can write the chat template: --tokenizer (a tokenizer.json, a folder holding
    one, a Hub id), else the --init model's own, else bytes; the chat markers ensured (chat_tokens),
    BOS present."""
    tok = load_tokenizer(tokenizer or (checkpoint_source(init) if init else ""))
    chat_tokens(tok)
    ids = token_ids(tok)
    if ids["bos"] is None:
        raise UserError("the tokenizer has no <|startoftext|> (BOS), which LLaDA's chat template starts with")
    return tok, ids


# ----------------------------------------------------------------------------- --init: the model to fine-tune

def checkpoint_source(init, flag="--init"):
    """--init as a local folder (a Hub id is downloaded); a name that is neither is one line."""
    with user_input():
        return checkpoint_folder(init, flag)


def init_config(init, preset, ids, block_size):
    """The model to fine-tune: --init's config.json (every field checked) with the tokenizer's MASK, or
    the model.py preset `preset` when training from scratch (init "")."""
    if not init:
        return model_config(preset, ids, block_size=block_size)
    folder = checkpoint_source(init)
    mc = read_model_config(folder, "--init")
    if block_size > mc.block_size:
        raise UserError(f"--block-size {block_size} exceeds --init's max_sequence_length {mc.block_size}")
    if ids["vocab"] > mc.vocab_size:
        raise UserError(f"the tokenizer has {ids['vocab']:,} ids; the --init model only {mc.vocab_size:,}")
    with user_input():
        masking.check_mask_id(ids["mask"], ids["vocab"], mc.vocab_size, ids["special"])
    return replace(mc, mask_id=ids["mask"])


def planned_config(init):
    """--dry-run's model: --init's config.json (a local folder, or only that file from the Hub); None
    when training from scratch (the preset's); LLaDA-8B-Base's architecture for its Hub id."""
    if not init:
        return None
    if init == LLADA:
        return model_lib.get_config("llada-8b")
    if os.path.isdir(init):
        return read_model_config(init, "--init")
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(init, "config.json")
    except Exception as e:
        raise UserError(f"--init {init}: no local folder, and its config.json could not be had from the "
                        f"Hub ({type(e).__name__})") from None
    return read_model_config(os.path.dirname(path), "--init")


# ----------------------------------------------------------------------------- safetensors and config.json

def looks_local(name):
    """A name meant as a local path, not a Hub id (owner/name): it exists, starts with . / or ~, has
    other than two parts, or its first part is a local folder (a typo inside out/, say)."""
    parts = name.split("/")
    return os.path.exists(name) or name.startswith((".", "/", "~")) or len(parts) != 2 or os.path.isdir(parts[0])


def checkpoint_folder(path_or_id, flag="checkpoint"):
    """A local folder as is; a Hub id (owner/name) is downloaded (safetensors + json only). A name
    that is neither is one line saying where it was looked for, before any Hub retries."""
    if os.path.isdir(path_or_id):
        return path_or_id
    where = os.path.abspath(os.path.expanduser(path_or_id))
    if os.path.exists(path_or_id):
        raise ValueError(f"{flag} {path_or_id} is a file, not a folder with config.json and model.safetensors")
    if looks_local(path_or_id):
        raise ValueError(f"{flag} {path_or_id}: no such local folder ({where}); not tried as a Hub id, which has "
                         f"the form owner/name")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_id, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # offline, unknown repo, gated: one line for the user
        raise ValueError(f"{flag} {path_or_id}: no local folder {where}, and the Hub id {path_or_id} could not be "
                         f"downloaded ({type(e).__name__}); offline, pass a local LLaDA-format folder") from None


FLOAT_DTYPES = ("F32", "BF16", "F16")        # safetensors' names of the dtypes a checkpoint may hold


def safetensors_index(path_or_id):
    """{key without "model.": (file, stored key, shape)} of a (sharded) safetensors checkpoint,
    read from the headers only: tensors are loaded one at a time, when needed. Weights that are
    not floating point (an int8-quantised export, say) are refused here, not after loading."""
    from safetensors import safe_open
    folder = checkpoint_folder(path_or_id)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder} has neither model.safetensors.index.json nor model.safetensors")
    out = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"shard {name} named in {index} is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    tensor = f.get_slice(k)
                    out[k.removeprefix("model.")] = (path, k, tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as e:            # truncated or not safetensors: the user's file
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    wrong = sorted((k, e[3]) for k, e in out.items() if e[3] not in FLOAT_DTYPES)
    if wrong:
        raise ValueError(f"{folder} holds {len(wrong)} tensors that are not float32/bfloat16/float16 (first: "
                         f"{wrong[0][0]}, {wrong[0][1]}): a quantised checkpoint, which this model does not load")
    return out


def read_tensor(entry):
    from safetensors import safe_open
    path, key = entry[:2]
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def check_fit(index, expected, path_or_id):
    """Every key of the model in the checkpoint, with its shape, and nothing else."""
    missing = sorted(expected.keys() - index.keys())
    unexpected = sorted(index.keys() - expected.keys())
    wrong = [f"{k} {index[k][2]} vs {tuple(expected[k].shape)}"
             for k in sorted(expected.keys() & index.keys()) if index[k][2] != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if v]
        raise ValueError(f"checkpoint {path_or_id} does not fit the model: " + "; ".join(parts))


@torch.no_grad()
def load_safetensors(model, path_or_id):
    """Load a LLaDA-format checkpoint into `model` (unsharded), checking every key and shape first.
    A model built on the meta device takes the checkpoint's tensors as they are; a materialised one
    copies them in, one tensor at a time. (An FSDP-sharded model: fsdp.load_sharded.)"""
    index = safetensors_index(path_or_id)
    expected = model.state_dict()
    check_fit(index, expected, path_or_id)
    if any(p.is_meta for p in model.parameters()):
        model.load_state_dict({k: read_tensor(index[k]) for k in expected}, assign=True)
        if model.cfg.tie_weights:
            model.transformer.ff_out.weight = model.transformer.wte.weight
    else:
        for k, p in expected.items():
            p.copy_(read_tensor(index[k]).to(device=p.device, dtype=p.dtype))
    return model


def save_safetensors(model, folder, max_shard_bytes=5 * 2**30, dtype=None):
    """Write `model` (a module or a full state dict) as LLaDA's checkpoints are laid out:
    "model."-prefixed keys in model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json. dtype: cast floating tensors (LLaDA ships bfloat16)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    shards, current, size = [], {}, 0
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current["model." + k] = v.clone().contiguous()   # clone: tied tensors saved twice
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# LLaDA's config.json names (an OLMo-style config) for our fields; what it does not name is ours.
LLADA_JSON_NAMES = {"vocab_size": "vocab_size", "mask_id": "mask_token_id", "block_size": "max_sequence_length",
                    "n_layer": "n_layers", "n_head": "n_heads", "d_model": "d_model",
                    "mlp_hidden": "mlp_hidden_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
                    "bias": "include_bias", "tie_weights": "weight_tying"}


def config_to_json(cfg, **token_ids):
    """config.json for an exported folder, in LLaDA's key names (so the same reader takes
    GSAI-ML/LLaDA-8B-Base's own config.json) plus token ids such as eos_token_id."""
    out = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "embedding_size": cfg.vocab_size,
           "layer_norm_type": "rms" if cfg.norm == "rmsnorm" else "default",
           "activation_type": "silu" if cfg.mlp == "swiglu" else "gelu", "rope": cfg.pos == "rope",
           "block_type": "llama" if cfg.mlp == "swiglu" else "sequential", "n_kv_heads": cfg.n_head}
    out.update({llada: getattr(cfg, ours) for ours, llada in LLADA_JSON_NAMES.items()})
    return {**out, **token_ids}


JSON_TYPES = {"vocab_size": int, "mask_id": int, "block_size": int, "n_layer": int, "n_head": int, "d_model": int,
              "mlp_hidden": int, "rope_theta": (int, float), "norm_eps": (int, float), "bias": bool,
              "tie_weights": bool}


def config_from_json(d):
    """ModelConfig from a config.json dict written by config_to_json or shipped with LLaDA. Every
    field is checked (type and range), so a file that is valid JSON but not a model's config is
    refused here rather than deep inside the model."""
    if not isinstance(d, dict):
        raise ValueError(f"config.json holds a JSON {type(d).__name__}, not an object")
    try:
        if d.get("n_kv_heads", d["n_heads"]) != d["n_heads"]:
            raise ValueError(f"grouped-query attention (n_kv_heads {d['n_kv_heads']}) is not supported")
        values = {ours: d[llada] for ours, llada in LLADA_JSON_NAMES.items() if llada in d}
        values["vocab_size"] = d.get("embedding_size") or d["vocab_size"]
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}") from None
    for name, value in values.items():
        kind = JSON_TYPES[name]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ValueError(f"config.json's {LLADA_JSON_NAMES.get(name, name)} is {value!r}, not "
                             f"{'an integer' if kind is int else 'true/false' if kind is bool else 'a number'}")
        if kind is not bool and not (value > 0 or (name == "mask_id" and value == 0)):
            raise ValueError(f"config.json's {LLADA_JSON_NAMES.get(name, name)} is {value!r}; it must be positive")
    values.update(norm="rmsnorm" if d.get("layer_norm_type", "rms") == "rms" else "layernorm",
                  mlp="swiglu" if d.get("activation_type", "silu") == "silu" else "gelu",
                  pos="rope" if d.get("rope", True) else "learned")
    return model_lib.ModelConfig(**values)
