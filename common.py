"""
Run plumbing every experiment script shares, so that none of them re-implements
it: the command-line vocabulary, device choice, atomic files, resumable RNG
state, progress with ETA, and one-line errors. No science lives here (that is
masking.py, model.py and theory.py).
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch


def add_common_args(p, *, presets, preset, t0=0.0, t1=1.0, max_steps=None, out_dir="out",
                    resume_help="continue from OUT_DIR/ckpt.pt (none yet: a fresh run)",
                    dry_run_help="build everything, run 2 steps, write nothing"):
    """The flags every script shares: --preset --t0 --t1 --seed --device --max-steps
    --out-dir --resume --compile --dry-run --plot."""
    p.add_argument("--preset", default=preset, choices=sorted(presets), help="named group of settings (%(default)s)")
    p.add_argument("--t0", type=float, default=t0, help="mask ratio t ~ U[t0, t1]: lower end (%(default)s)")
    p.add_argument("--t1", type=float, default=t1, help="mask ratio t ~ U[t0, t1]: upper end (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and masks (%(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (%(default)s)")
    p.add_argument("--max-steps", type=int, default=max_steps, help="training steps (default: the preset's)")
    p.add_argument("--out-dir", default=out_dir, help="everything the run writes, ending with summary.json "
                                                      "(%(default)s)")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--allow-change", nargs="+", default=(), metavar="SETTING",
                   help="--resume: settings (e.g. max_steps) that may differ from the checkpoint's; recorded in "
                        "summary.json. Without it a changed setting is refused")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: off; on GPUs for the 8B scripts)")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    return p


def field_comments(cls):
    """{field: the comment on its line} of a settings dataclass: the one place a setting is explained."""
    import inspect
    import re
    found = (re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)", line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def add_config_args(p, cls, defaults, label, skip=("t0", "t1", "seed", "max_steps"), helps=None):
    """A --flag for every field of a settings dataclass (the shared ones come from add_common_args),
    its help the field's comment (or helps[name]) and its value under the default preset
    (`defaults`, named `label`). None means "not given", so the preset's value stands."""
    from dataclasses import fields
    text = {**field_comments(cls), **(helps or {})}
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else dict(type=type(f.default))
        value = defaults.get(f.name, f.default)
        p.add_argument("--" + f.name.replace("_", "-"), default=None, **kind,
                       help=f"{text.get(f.name, '')} ({label}: {value!r})".replace("%", "%%"))


def config_from_args(a, cls, presets):
    """The settings of a run: the preset's, then every flag the user gave."""
    from dataclasses import fields
    values = dict(presets[a.preset])
    values.update({f.name: getattr(a, f.name) for f in fields(cls) if getattr(a, f.name, None) is not None})
    return cls(**values)


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but this PyTorch sees no CUDA device")
    if not (name == "cpu" or name.startswith("cuda") or name == "mps"):
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)")
    return name


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG a run draws from, so a resumed run continues bit-identically."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path):
    """Write then rename: a crash mid-write never leaves a half checkpoint behind."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load a checkpoint to the CPU (RNG states must stay CPU tensors). A truncated or
    corrupt file is the user's to fix, so it is a one-line error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:          # zip reader, unpickler, EOF: all mean the same to the user
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: truncated or corrupt); "
                         f"delete it, or start without --resume") from None


def restore(module, state, path):
    """module.load_state_dict(state), with a checkpoint from another configuration as a one-line error."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ValueError(f"checkpoint {path} does not fit this run's settings ({first}); "
                         f"use the settings it was written with, or another --out-dir") from None


CREATED = []     # folders prepare_out_dir made: a run refused afterwards removes them again if still empty


def prepare_out_dir(path):
    """Create --out-dir now and prove it writable, so that a path that is a file, or lies under
    one, or cannot be written, is a one-line error before any work starts."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out-dir {path} exists and is not a folder")
    new = os.path.abspath(path)
    while new != os.path.dirname(new) and not os.path.exists(new):    # folders this call creates, leaf first
        CREATED.append(new)
        new = os.path.dirname(new)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out-dir {path} cannot be written ({e.strerror or type(e).__name__})") from None
    return path


RUN_MARKERS = ("summary.json", "ckpt.pt")      # and step_* folders: what a run leaves in its --out-dir


def check_fresh(out_dir, resume):
    """A run without --resume never writes over an earlier one: an --out-dir that already holds a
    summary.json, a ckpt.pt or step_* checkpoints is refused before any work."""
    if resume or not os.path.isdir(out_dir):
        return
    found = sorted(f for f in os.listdir(out_dir) if f in RUN_MARKERS or f.startswith("step_"))
    if found:
        raise ValueError(f"--out-dir {out_dir} holds an earlier run ({', '.join(found[:3])}); pass --resume to "
                         f"continue it, or choose another --out-dir")


def check_resume_settings(saved, now, path, allow=(), ignore=()):
    """--resume with settings that change the run is refused, naming them: the run would otherwise
    be labelled with settings it was not trained with. `allow` (--allow-change) lets named settings
    differ; `ignore` are bookkeeping (logging, checkpoint cadence). Returns {name: [old, new]} of
    the allowed changes, for the summary."""
    differ = {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v and k not in ignore}
    refused = [k for k in differ if k not in allow]
    if refused:
        shown = ", ".join(f"{k} {differ[k][0]!r} -> {differ[k][1]!r}" for k in refused)
        raise ValueError(f"--resume: {path} was written with other settings ({shown}); resume with its settings, "
                         f"or pass --allow-change {' '.join(refused)} to change them knowingly")
    return differ


def check_positive(**sizes):
    """Sizes and counts a user gives, each > 0, as one line naming the flag."""
    for name, value in sizes.items():
        if value is None or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


OPTIMIZER_RANGES = {          # the training settings a config may have: (what is allowed, test)
    "lr": ("positive", lambda v: v > 0),
    **{name: (">= 0", lambda v: v >= 0) for name in ("min_lr", "warmup", "weight_decay", "grad_clip", "init_std")},
    "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    **{name: ("in [0, 1]", lambda v: 0 <= v <= 1) for name in ("decay_frac", "random_length_prob")},
}


def check_optimizer(cfg):
    """Learning rate, schedule, AdamW, clipping and init-std settings in range, as one line naming
    the flag, before any work (AdamW's own complaint would come only after the data and model had loaded)."""
    for name, (allowed, ok) in OPTIMIZER_RANGES.items():
        if hasattr(cfg, name) and not ok(getattr(cfg, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(cfg, name)}")


def read_text(path, what):
    """The UTF-8 text of a user-given file; missing, unreadable or binary is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def write_text(path, text):
    """Write then rename: a reader never sees half a file, and a failure leaves the old one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Progress:
    """Elapsed time and ETA for a loop of `total` steps starting at `start`."""

    def __init__(self, total, start=0):
        self.total, self.start, self.t0 = total, start, time.time()

    def elapsed(self):
        return time.time() - self.t0

    def eta(self, step):
        done = step - self.start
        left = (self.total - step) * self.elapsed() / done if done > 0 else float("nan")
        return f"{self.elapsed():.0f}s elapsed, ETA {left:.0f}s"


def time_steps(step, steps, warmup, device):
    """Benchmark timing: run `step` warmup times untimed, then `steps` times; on CUDA synchronise
    and reset the peak-memory counter first. Returns (seconds of the timed steps, their outputs
    stacked)."""
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    out = torch.stack([step() for _ in range(steps)])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.time() - start, out


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cli(main):
    """Run main(); a user error (bad flag value, missing file) is one line on stderr, no traceback.
    Under torchrun only rank 0 prints it; every rank exits with status 1."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        for path in CREATED:              # a refused run leaves no empty --out-dir behind
            try:
                os.rmdir(path)
            except OSError:
                break
        sys.exit(f"error: {e}" if int(os.environ.get("RANK", "0")) == 0 else 1)
    except KeyboardInterrupt:
        sys.exit("interrupted")


def gpt2_tokenizer(tokenizer_file=None):
    """tiktoken's GPT-2 BPE (r50k_base: 50257 ids, <|endoftext|> = 50256). With
    tokenizer_file (a local gpt2.tiktoken rank file) nothing is downloaded."""
    import tiktoken
    if tokenizer_file is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:   # offline and not cached: say what to do instead
            raise ValueError(f"could not fetch GPT-2's BPE ranks ({type(e).__name__}); "
                             f"pass --tokenizer-file with a local gpt2.tiktoken") from None
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    if not os.path.exists(tokenizer_file):
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} does not exist")
    try:
        ranks = load_tiktoken_bpe(tokenizer_file)
    except Exception as e:           # a folder, a binary, another format: the user's file
        raise ValueError(f"{tokenizer_file} is not a tiktoken rank file ({type(e).__name__})") from None
    if len(ranks) != 50256:
        raise ValueError(f"{tokenizer_file} has {len(ranks)} ranks; GPT-2's rank file has 50256")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


WIKITEXT_HUB_NAMES = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}


def wikitext_hub_text(dataset, split):
    """Raw text of a Hub WikiText split (wikitext-103, wikitext-2 or a full config name such as
    wikitext-103-raw-v1); needs internet once, then `datasets` caches it."""
    from datasets import load_dataset
    name = WIKITEXT_HUB_NAMES.get(dataset, dataset)
    split = {"valid": "validation"}.get(split, split)
    try:
        rows = load_dataset("wikitext", name, split=split)
    except Exception as e:
        raise ValueError(f"could not load wikitext/{name} [{split}] from the Hub ({type(e).__name__}); "
                         f"offline, pass local raw files instead") from None
    return "".join(rows["text"])
