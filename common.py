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


def add_common_args(p, *, presets, preset, t0=0.0, t1=1.0, max_steps=None, out_dir="out"):
    """The flags every script shares: --preset --t0 --t1 --seed --device --max-steps
    --out-dir --resume --compile --dry-run --plot."""
    p.add_argument("--preset", default=preset, choices=sorted(presets), help="named group of settings (%(default)s)")
    p.add_argument("--t0", type=float, default=t0, help="mask ratio t ~ U[t0, t1]: lower end (%(default)s)")
    p.add_argument("--t1", type=float, default=t1, help="mask ratio t ~ U[t0, t1]: upper end (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (%(default)s)")
    p.add_argument("--max-steps", type=int, default=max_steps, help="training steps (default: the preset's)")
    p.add_argument("--out-dir", default=out_dir, help="everything the run writes, ending with summary.json "
                                                      "(%(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--dry-run", action="store_true", help="build everything, run 2 steps, write nothing")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    return p


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


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
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


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cli(main):
    """Run main(); a user error (bad flag value, missing file) is one line on stderr, no traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
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
    ranks = load_tiktoken_bpe(tokenizer_file)
    if len(ranks) != 50256:
        raise ValueError(f"{tokenizer_file} has {len(ranks)} ranks; GPT-2's rank file has 50256")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})
