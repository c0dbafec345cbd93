"""
Run plumbing every experiment script shares, so that none of them re-implements it: the
command-line vocabulary, user errors, device choice, atomic files, run folders (who owns an
--out-dir, one writer at a time), resumable RNG state, the learning-rate schedule, progress with
ETA, interrupts, and the distributed setup (torchrun, rank agreement, bounded timeouts). No
science lives here (that is masking.py, model.py and theory.py).

Errors come in two kinds. A `UserError` is something the user can fix (a flag, a file, a folder):
it is raised at the input edges and printed as one line. Anything else is a bug in our code (or
torch's) and keeps its traceback.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import masking


class UserError(ValueError):
    """A mistake the user can fix: printed as one line by run_cli, never a traceback. A ValueError,
    so that library callers that catch ValueError keep working."""


@contextlib.contextmanager
def user_input():
    """The shared modules (masking, model, theory) check their arguments with ValueError; called at
    a script's edge, on values the user gave, such an error is the user's to fix."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------- command line

def add_common_args(p, *, presets, preset, t0=0.0, t1=1.0, max_steps=None, out_dir=None,
                    resume_help="continue from the run's checkpoint in OUT_DIR (none yet: a fresh run)",
                    dry_run_help="build everything, run 2 steps, write nothing"):
    """The flags every script shares: --preset --t0 --t1 --seed --device --max-steps
    --out-dir --resume --compile --dry-run --plot. out_dir=None: named by the run's settings."""
    p.add_argument("--preset", default=preset, choices=sorted(presets), help="named group of settings (%(default)s)")
    p.add_argument("--t0", type=float, default=t0, help="mask ratio t ~ U[t0, t1]: lower end (%(default)s)")
    p.add_argument("--t1", type=float, default=t1, help="mask ratio t ~ U[t0, t1]: upper end (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and masks, in [0, 2^31) "
                                                       "(%(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (%(default)s)")
    p.add_argument("--max-steps", type=int, default=max_steps, help="training steps (default: the preset's)")
    p.add_argument("--out-dir", default=out_dir, help="everything the run writes, ending with summary.json "
                                                      "(default: a folder named by the run's settings)")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--allow-change", nargs="+", default=(), metavar="SETTING",
                   help="--resume: settings (e.g. max_steps) that may differ from the checkpoint's; recorded in "
                        "summary.json. Without it a changed setting is refused")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: off; on GPUs for the 8B scripts)")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    return p


def add_dist_args(p, default=600):
    """--dist-timeout, for the scripts torchrun launches."""
    p.add_argument("--dist-timeout", type=float, default=default, metavar="SECONDS",
                   help="torchrun: how long a rank waits for the others (rendezvous, collectives) before the run "
                        "fails, so that a lost rank becomes an error torchrun can restart (%(default)s)")
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


def run_name(*parts):
    """A folder name from a run's defining settings: 'md', 'U0-0.246', 'n20k6', 's0' -> md_U0-0.246_n20k6_s0."""
    return "_".join(str(p) for p in parts if p not in (None, ""))


def interval_name(t0, t1):
    return f"U{t0:g}-{t1:g}"


# ----------------------------------------------------------------------------- checks at the edge

def check_positive(**sizes):
    """Sizes and counts a user gives, each > 0, as one line naming the flag."""
    for name, value in sizes.items():
        if value is None or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_nonnegative(**values):
    for name, value in values.items():
        if value is None or value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


SEED_LIMIT = 2 ** 31      # numpy's seeds stop at 2^32; the seed is also scaled into generator seeds


def check_seed(seed, flag="seed"):
    """One rule for every script: an integer in [0, 2^31)."""
    if not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise UserError(f"--{flag} must be an integer in [0, 2^31), got {seed}")


OPTIMIZER_RANGES = {          # the training settings a config may have: (what is allowed, test)
    "lr": ("positive", lambda v: v > 0),
    **{name: (">= 0", lambda v: v >= 0) for name in ("min_lr", "warmup", "weight_decay", "grad_clip", "init_std")},
    "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    **{name: ("in [0, 1]", lambda v: 0 <= v <= 1) for name in ("decay_frac", "random_length_prob")},
}


def check_optimizer(cfg):
    """Learning rate, schedule, AdamW, clipping and init-std settings in range, as one line naming
    the flag, before any work (AdamW's own complaint would come only after the data and model had
    loaded); and the seed."""
    for name, (allowed, ok) in OPTIMIZER_RANGES.items():
        if hasattr(cfg, name) and not ok(getattr(cfg, name)):
            raise UserError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(cfg, name)}")
    if hasattr(cfg, "seed"):
        check_seed(cfg.seed)


def check_interval(t0, t1, trains=True):
    """The mask-ratio interval as the user gave it. A training run needs t1 > 0: with t = 0 nothing is
    masked, the loss and its gradient are 0 and the run would learn nothing while looking fine."""
    with user_input():
        masking.check_interval(t0, t1)
    if trains and t1 == 0:
        raise UserError("--t1 0 masks nothing (loss and gradient 0); the interval needs t1 > 0")


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this PyTorch sees no CUDA device")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but this PyTorch has no MPS device (Apple silicon only)")
    if name.startswith("cuda:") and not (name[5:].isdigit() and int(name[5:]) < torch.cuda.device_count()):
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if not (name in ("cpu", "cuda", "mps") or name.startswith("cuda:")):
        raise UserError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)")
    return name


# ----------------------------------------------------------------------------- randomness

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


# ----------------------------------------------------------------------------- the learning rate

def lr_at(step, lr, *, warmup=0, max_steps=1, schedule="constant", min_lr=0.0, decay_frac=0.0):
    """Linear warm-up over `warmup` steps, then: constant; cosine to min_lr at max_steps (nanoGPT);
    or wsd, constant until the last decay_frac of the steps and linear to min_lr over them (LLaDA's
    shape). The one schedule of every script."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - min_lr)
    decay_start = max_steps - int(decay_frac * max_steps)
    if step < decay_start:
        return lr
    frac = (step - decay_start) / max(1, max_steps - decay_start)
    return lr + frac * (min_lr - lr)


def clip_gradients(parameters, max_norm):
    """The global gradient norm, the gradients clipped to max_norm; max_norm 0 means never (the
    norm is still measured: clip_grad_norm_ itself would multiply every gradient by 0)."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)


# ----------------------------------------------------------------------------- files

def write_failure(path, e):
    """A write that failed for the disk's reasons (full, file too large, read-only, gone) as one line,
    naming the last complete checkpoint (still intact) when a run has one."""
    import errno
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:120]
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or not isinstance(e, OSError)
    return UserError(f"could not write {path} ({reason})" + ("; free space on that disk, or choose another --out-dir"
                                                             if full else "")
                     + (f"; {LAST_CHECKPOINT_NOTE()}, intact: continue with --resume" if LAST_CHECKPOINT_NOTE else ""))


def is_write_failure(e):
    """torch.save reports a failed write as a RuntimeError of its zip writer; the OS as OSError."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and ("write" in str(e) or "inline_container"
                                                                       in str(e)))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path to write; renamed over `path` only once whole. A failed write (disk
    full) removes the temporary file, leaves `path` as it was and is one line naming it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_failure(path, e) from None
        raise


def atomic_torch_save(obj, path):
    """Write then rename: a crash mid-write never leaves a half checkpoint behind."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def write_text(path, text):
    """Write then rename: a reader never sees half a file, and a failure leaves the old one."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def read_text(path, what):
    """The UTF-8 text of a user-given file; missing, unreadable or binary is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        line = 1 + open(path, "rb").read()[:e.start].count(b"\n")
        raise UserError(f"{what} {path} is not UTF-8 text (line {line}, byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None


def read_json(path, what):
    """A user-given JSON file as a dict; unreadable, broken or not an object is one line naming it."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"{what} {path} is not valid JSON (line {getattr(e, 'lineno', '?')}: "
                        f"{getattr(e, 'msg', e)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} holds a JSON {type(value).__name__}, not an object")
    return value


def load_checkpoint(path):
    """torch.load a checkpoint to the CPU (RNG states must stay CPU tensors). A truncated or
    corrupt file is the user's to fix, so it is a one-line error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:          # zip reader, unpickler, EOF: all mean the same to the user
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: truncated or corrupt); "
                        f"delete it, or start without --resume") from None


def restore(module, state, path):
    """module.load_state_dict(state), with a checkpoint from another configuration as a one-line error."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"checkpoint {path} does not fit this run's settings ({first}); "
                        f"use the settings it was written with, or another --out-dir") from None


# ----------------------------------------------------------------------------- run folders

CREATED = []     # folders prepare_out_dir made: a run refused afterwards removes them again if still empty
RUN_FILE = "run.json"        # {"script": ..., "settings": ...}: which script's run a folder holds
LOCK_FILE = ".lock"          # {"pid": ..., "host": ...}: the process writing the folder now
RUN_MARKERS = ("summary.json", "ckpt.pt", "history.json", "log.jsonl", "export", "tasks", "results.md")


def prepare_out_dir(path):
    """Create --out-dir now and prove it writable, so that a path that is a file, or lies under
    one, or cannot be written, is a one-line error before any work starts."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out-dir {path} exists and is not a folder")
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
        raise UserError(f"--out-dir {path} cannot be written ({e.strerror or type(e).__name__})") from None
    return path


def folder_owner(out_dir):
    """Which script's run --out-dir holds: run.json's (or summary.json's) "script"; "another script or an
    older version" for run files without one; None for an empty or missing folder."""
    if not os.path.isdir(out_dir):
        return None
    for name in (RUN_FILE, "summary.json"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    owner = json.load(f).get("script")
            except (ValueError, OSError, AttributeError):
                owner = None
            if owner:
                return owner
    entries = [f for f in os.listdir(out_dir) if f in RUN_MARKERS or f.startswith("step_") or f == RUN_FILE]
    return "another script or an older version" if entries else None


def same_settings(saved, now, ignore=()):
    """Two runs' settings alike, bookkeeping (`ignore`) aside."""
    return {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in now.items() if k not in ignore}


def finished_settings(out_dir):
    """The settings of the finished run in --out-dir (its summary.json), or None."""
    path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("settings")
    except (ValueError, OSError):
        return None


def claim_out_dir(out_dir, script, settings, *, resume, has_checkpoint, ignore=()):
    """What this run may do with --out-dir, decided before any work and before anything is written:

      "fresh"  - the folder is new or empty (with --resume: said, so a mistyped --out-dir shows),
                 or holds this script's unfinished run that saved no checkpoint yet, and --resume;
      "resume" - it holds this script's checkpoint and --resume was given;
      "done"   - it holds this script's finished run with these very settings: the caller says where
                 the result is and writes nothing (so re-running a finished command is harmless).

    Everything else is refused in one line: a folder holding another script's run; an earlier run
    without --resume; --resume of a finished run that left no checkpoint. Nothing a user had is
    ever overwritten."""
    owner = folder_owner(out_dir)
    if owner is None:
        if resume:
            print(f"--resume: no checkpoint in {out_dir} yet; starting a fresh run", flush=True)
        return "fresh"
    if owner != script:
        raise UserError(f"--out-dir {out_dir} holds a run of {owner}, not of {script}; choose another --out-dir")
    done = finished_settings(out_dir)
    if done is not None and same_settings(done, settings, ignore):
        return "done"
    if not resume:
        raise UserError(f"--out-dir {out_dir} holds an earlier run of {script}; pass --resume to continue it, or "
                        f"choose another --out-dir")
    if has_checkpoint:
        return "resume"
    if done is not None:
        raise UserError(f"--resume: {out_dir} holds a finished run with other settings and no checkpoint to continue "
                        f"from; choose another --out-dir")
    print(f"--resume: no checkpoint in {out_dir} yet; starting a fresh run", flush=True)
    return "fresh"


def take_out_dir(out_dir):
    """Create --out-dir (proved writable) and take its lock; returns the lock's path."""
    prepare_out_dir(out_dir)
    return lock_out_dir(out_dir)


def claim_collection(out_dir, kind, settings):
    """A folder of runs and their table (parity.py --compare / --ladder, wikitext.py --sweep): refused
    where another script's (or another kind of) run lives, since its summary would be written over;
    taken and marked as `kind`'s otherwise. Returns the lock's path."""
    owner = folder_owner(out_dir)
    if owner not in (None, kind):
        raise UserError(f"--out-dir {out_dir} holds a run of {owner}, not of {kind}; choose another --out-dir")
    lock = take_out_dir(out_dir)
    mark_run(out_dir, kind, settings)
    return lock


def finished_run(out_dir):
    """(summary, history) of the finished run in out_dir, the summary marked done=True: what a run
    given again returns instead of training."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "history.json")) as f:
        return dict(summary, done=True), json.load(f)


def mark_run(out_dir, script, settings):
    """run.json: the folder now holds this script's run (written at the start of a fresh or resumed run)."""
    write_json(os.path.join(out_dir, RUN_FILE), dict(script=script, settings=settings))


def already_done(out_dir, summary_keys=()):
    """The line a finished command run again prints: where its result is."""
    path = os.path.join(out_dir, "summary.json")
    with open(path) as f:
        s = json.load(f)
    shown = ", ".join(f"{k} {s[k]:.4g}" if isinstance(s.get(k), float) else f"{k} {s.get(k)}" for k in summary_keys
                      if k in s)
    return f"{out_dir} already holds this run, finished" + (f" ({shown})" if shown else "") + \
        f": see {path} (another --out-dir for a new run)"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_out_dir(out_dir):
    """One writer per --out-dir: a lock file with this process's pid and host. A second run into the
    same folder is refused while the first lives; a lock left by a dead process (same host) is
    taken over. Released at exit."""
    import atexit
    path = os.path.join(out_dir, LOCK_FILE)
    me = dict(pid=os.getpid(), host=socket.gethostname())
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    other = json.load(f)
            except (ValueError, OSError):
                other = {}
            if other.get("host") == me["host"] and not pid_alive(int(other.get("pid", -1))):
                with contextlib.suppress(OSError):
                    os.remove(path)            # stale: its process is gone
                continue
            if other == me:
                return path
            raise UserError(f"--out-dir {out_dir} is being written by another run (pid {other.get('pid')} on "
                            f"{other.get('host')}); wait for it, or choose another --out-dir (if that run is gone, "
                            f"delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        LOCKS.append((path, me))
        atexit.register(unlock, path, me)
        return path
    raise UserError(f"--out-dir {out_dir}: could not take its lock {path}")


LOCKS = []      # (path, owner) of the locks this process holds


def unlock(path, me):
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            if json.load(f) == me:
                os.remove(path)


def release_locks(path=None):
    """The end of a run (or of a refused one): its --out-dir (path: that lock alone; None: every lock
    this process holds) is free for the next writer."""
    for lock in [lock for lock in LOCKS if path in (None, lock[0])]:
        LOCKS.remove(lock)
        unlock(*lock)


def check_resume_settings(saved, now, path, allow=(), ignore=()):
    """--resume with settings that change the run is refused, naming them: the run would otherwise
    be labelled with settings it was not trained with. `allow` (--allow-change) lets named settings
    differ; `ignore` are bookkeeping (logging, checkpoint cadence). Returns {name: [old, new]} of
    the allowed changes, for the summary."""
    differ = {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v and k not in ignore}
    refused = [k for k in differ if k not in allow]
    if refused:
        shown = ", ".join(f"{k} {differ[k][0]!r} -> {differ[k][1]!r}" for k in refused)
        raise UserError(f"--resume: {path} was written with other settings ({shown}); resume with its settings, "
                        f"or pass --allow-change {' '.join(refused)} to change them knowingly")
    return differ


# ----------------------------------------------------------------------------- progress and timing

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


# ----------------------------------------------------------------------------- the command line's end

LAST_CHECKPOINT_NOTE = None     # set by a training loop: () -> "the last complete checkpoint is ..."


def resume_command():
    """The command to continue this run: this one, with --resume."""
    argv = [a for a in sys.argv[1:]]
    launcher = "torchrun ... " if "TORCHELASTIC_RUN_ID" in os.environ else "python "
    return launcher + " ".join([os.path.basename(sys.argv[0])] + argv + ([] if "--resume" in argv else ["--resume"]))


class Interrupted(BaseException):
    """SIGTERM (a scheduler's or torchrun's stop), raised in the main thread like Ctrl-C."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)        # a second SIGTERM ends the process at once
    raise Interrupted()


def run_cli(main):
    """Run main(). A UserError is one line on stderr, no traceback; under torchrun only rank 0 prints
    it and every rank exits with status 1. Ctrl-C and SIGTERM are one line naming the last complete
    checkpoint and the command that continues the run. Any other exception is a bug: its traceback."""
    import atexit
    with contextlib.suppress(ValueError):            # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _on_sigterm)
        atexit.register(signal.signal, signal.SIGTERM, signal.SIG_DFL)    # no exception while exiting
    rank0 = not all(v in os.environ for v in TORCHRUN_VARS) or int(os.environ["RANK"]) == 0   # stale RANK=1: print
    try:
        main()
    except UserError as e:
        release_locks()
        for path in CREATED:              # a refused run leaves no empty --out-dir behind
            try:
                os.rmdir(path)
            except OSError:
                break
        sys.exit(f"error: {e}" if rank0 and not getattr(e, "reported", False) else 1)
    except (KeyboardInterrupt, Interrupted) as e:
        note = LAST_CHECKPOINT_NOTE() if LAST_CHECKPOINT_NOTE else None
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped (SIGTERM)"
        if rank0:
            print(f"{what}" + (f"; {note}; continue with: {resume_command()}" if note else ""), file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143)


# ----------------------------------------------------------------------------- distributed runs

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CONTROL = None     # a gloo group for CPU flags (errors, lengths, data positions): never waits on a GPU queue


def torchrun_environment():
    """True under torchrun (every variable it sets is there), False for a plain process (none is).
    Some but not all of them are stale variables of another launch: one line, not a silent wait."""
    present = [v for v in TORCHRUN_VARS if v in os.environ]
    if present and len(present) < len(TORCHRUN_VARS):
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        raise UserError(f"the environment sets {', '.join(f'{v}={os.environ[v]}' for v in present)} but not "
                        f"{', '.join(missing)}: left over from another launch? unset them, or launch with torchrun")
    return bool(present)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(device, timeout_s=600.0, backend=None):
    """One process per GPU under torchrun (NCCL; gloo on CPUs); a plain `python` run is a world of one,
    so the same code runs everywhere. Every group waits at most `timeout_s` (rendezvous included): a
    rank that is gone becomes an error torchrun can restart (--max-restarts), not a hang. Returns
    (rank, world, device)."""
    global CONTROL
    if timeout_s <= 0:
        raise UserError(f"--dist-timeout must be positive, got {timeout_s}")
    torchrun = torchrun_environment()
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if cuda else "gloo")
    timeout = timedelta(seconds=timeout_s)
    try:
        if torchrun:
            init_under_torchrun(backend, timeout)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    except dist.DistError as e:
        env = ", ".join(f"{v}={os.environ.get(v)}" for v in TORCHRUN_VARS)
        raise UserError(f"the {os.environ.get('WORLD_SIZE', 1)} processes did not meet within --dist-timeout "
                        f"{timeout_s:g}s ({env}; {type(e).__name__}): stale variables of another launch, or a node "
                        f"that did not start") from None
    CONTROL = dist.new_group(backend="gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def init_under_torchrun(backend, timeout):
    """The default group under torchrun. On one node torchrun hands every restart of the workers the
    same rendezvous store (its agent's), whose keys torch does not prefix by attempt: a restarted
    group could read the dead group's addresses and fail to connect, or hang. The keys of each
    attempt get a prefix of their own here (every worker of a node has the same restart count).
    Across nodes the counts may differ, so there the launcher must not share its store:
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every rendezvous round a store of its own (README)."""
    world = int(os.environ["WORLD_SIZE"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("LOCAL_WORLD_SIZE", -1)) != world:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ["RANK"]) == 0:
            print("warning: several nodes share torchrun's rendezvous store; a restart may then meet the dead "
                  "workers' addresses: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README)", flush=True)
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"signal-rich/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)


def teardown():
    global CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    CONTROL = None


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast(value):
    """Rank 0's value on every rank (over gloo): what rank 0 alone may decide, such as which checkpoint
    to resume or what a folder holds."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=CONTROL)
    return box[0]


def failure_of(e):
    """(kind, text) of an exception for agree(): a UserError's message, or a bug's traceback."""
    if isinstance(e, UserError):
        return ("user", str(e))
    return ("bug", "".join(traceback.format_exception(e)))


def agree(failure=None, group=None):
    """Every rank says whether it failed (None, or failure_of(e)); if any did, every rank stops: with
    the first user error's one line (raised as UserError on every rank), or, for a bug, its traceback
    printed once by rank 0 and status 1 everywhere. One all-reduce of a CPU flag when all is well,
    so no rank is ever left waiting in a collective another rank will not reach."""
    if world_size() == 1:
        return
    group = group or CONTROL
    flag = torch.tensor([0.0 if failure is None else 1.0])
    dist.all_reduce(flag, group=group)
    if not flag.item():
        return
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure, group=group)
    user = next((text for f in failures if f for kind, text in [f] if kind == "user"), None)
    if user is not None:        # rank 0 prints it before any rank exits (torchrun stops the others when one exits)
        if dist.get_rank() == 0:
            print(f"error: {user}", file=sys.stderr, flush=True)
        dist.barrier(group=group)
        error = UserError(user)
        error.reported = True
        raise error
    rank, (_, text) = next((r, f) for r, f in enumerate(failures) if f)
    if dist.get_rank() == 0:
        sys.stderr.write(f"rank {rank} failed:\n{text}")
        sys.stderr.flush()
    dist.barrier(group=group)
    raise SystemExit(1)


def on_every_rank(fn, *args):
    """fn(*args) on every rank, its failures agreed on by all ranks (agree). In a world of one the
    exception propagates as it is."""
    if world_size() == 1:
        return fn(*args)
    out, failure = None, None
    try:
        out = fn(*args)
    except Exception as e:
        failure = failure_of(e)
    agree(failure)
    return out


# ----------------------------------------------------------------------------- tokenizers and Hub text

def gpt2_tokenizer(tokenizer_file=None):
    """tiktoken's GPT-2 BPE (r50k_base: 50257 ids, <|endoftext|> = 50256). With
    tokenizer_file (a local gpt2.tiktoken rank file) nothing is downloaded."""
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
        raise UserError(f"could not load wikitext/{name} [{split}] from the Hub ({type(e).__name__}); "
                        f"offline, pass local raw files instead") from None
    return "".join(rows["text"])
