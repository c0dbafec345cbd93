"""
The command line every script shares: one vocabulary of flags, the checks that turn a user's mistake
into one line, and run_cli, which prints that line (never a traceback) and turns Ctrl-C or SIGTERM into
a line naming what was kept and the command that continues.

Errors come in two kinds. A `UserError` is something the user can fix (a flag, a file, a folder): it
is raised at the input edges and printed as one line. Anything else is a bug in our code (or torch's)
and keeps its traceback.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
from dataclasses import fields

import torch


class UserError(ValueError):
    """A mistake the user can fix: printed as one line by run_cli, never a traceback. A ValueError,
    so that library callers that catch ValueError keep working."""


@contextlib.contextmanager
def user_input():
    """The science modules (masking, model, theory) check their arguments with ValueError; called at a
    script's edge, on values the user gave, such an error is the user's to fix."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from None


class Interrupted(BaseException):
    """SIGTERM (a scheduler's or torchrun's stop), raised in the main thread like Ctrl-C. A Run that
    it passes through sets `note`: what was kept, and the command that continues."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)        # a second SIGTERM ends the process at once
    raise Interrupted()


def resume_command():
    """The command to continue this run: this one, with --resume."""
    argv = list(sys.argv[1:])
    launcher = "torchrun ... " if "TORCHELASTIC_RUN_ID" in os.environ else "python "
    return launcher + " ".join([os.path.basename(sys.argv[0])] + argv + ([] if "--resume" in argv else ["--resume"]))


def run_cli(main):
    """Run main(). A UserError is one line on stderr, no traceback; under torchrun only rank 0 prints it
    and every rank exits with status 1. Ctrl-C and SIGTERM are one line with what was kept (the note a
    Run or a sweep gave the exception). Any other exception is a bug: its traceback."""
    import atexit
    from machinery.distributed import TORCHRUN_VARS
    with contextlib.suppress(ValueError):            # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _on_sigterm)
        atexit.register(signal.signal, signal.SIGTERM, signal.SIG_DFL)    # no exception while exiting
    rank0 = not all(v in os.environ for v in TORCHRUN_VARS) or int(os.environ["RANK"]) == 0   # stale RANK=1: print
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}" if rank0 and not getattr(e, "reported", False) else 1)
    except (KeyboardInterrupt, Interrupted) as e:
        note = getattr(e, "note", None)
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped (SIGTERM)"
        if rank0:
            print(what + (f"; {note}" if note else ""), file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143)


# ----------------------------------------------------------------------------- the shared flags

def parser(description, *, presets, preset, t0=0.0, t1=1.0, torchrun=False,
           resume_help="continue from the run's checkpoint in OUT_DIR (none yet: a fresh run)",
           dry_run_help="build everything, run 2 steps, write nothing"):
    """An ArgumentParser holding the flags every training script shares: --preset --t0 --t1 --seed --device
    --max-steps --out-dir --resume --allow-change --compile --dry-run --plot (and --dist-timeout for the
    scripts torchrun launches). The script adds its own, then calls parse()."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default=preset, choices=sorted(presets), help="named group of settings (%(default)s)")
    p.add_argument("--t0", type=float, default=t0, help="mask ratio t ~ U[t0, t1]: lower end (%(default)s)")
    p.add_argument("--t1", type=float, default=t1, help="mask ratio t ~ U[t0, t1]: upper end (%(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed of the weights, data order and masks, in [0, 2^31) "
                                                          "(default: the preset's, 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (%(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--out-dir", default=None, help="everything the run writes, ending with summary.json "
                                                   "(default: a folder named by the run's settings)")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--allow-change", nargs="+", default=(), metavar="SETTING",
                   help="--resume: settings (e.g. max_steps) or inputs (e.g. data) that may differ from the "
                        "checkpoint's; recorded in summary.json. Without it a change is refused")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: off; on GPUs for the 8B scripts)")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    if torchrun:
        add_dist_flag(p)
    return p


def add_dist_flag(p, default=600):
    """--dist-timeout, for the scripts torchrun launches."""
    p.add_argument("--dist-timeout", type=float, default=default, metavar="SECONDS",
                   help="torchrun: how long a rank waits for the others (rendezvous, collectives) before the run "
                        "fails, so that a lost rank becomes an error torchrun can restart (%(default)s)")


def show_defaults(p, cls, preset_values, label):
    """Append to the help of each flag that sets a field of `cls` its value under the default preset
    ("(paper preset: 512)"): the flags default to None, meaning "the preset's"."""
    values = {f.name: preset_values.get(f.name, f.default) for f in fields(cls)}
    for action in p._actions:
        if action.dest in values and action.default is None and action.help and "default" not in action.help:
            action.help = f"{action.help} ({label}: {values[action.dest]!r})".replace("%", "%%")


def parse(p, argv, cls=None, presets=None):
    """The parsed flags; a float flag given as nan or inf is one line (every comparison with NaN is
    False, so range checks alone would let it through). With a settings dataclass `cls` and its
    `presets`, returns (flags, settings): the preset's settings, then every flag the user gave (the
    help of each such flag shows the default preset's value)."""
    if cls is not None:
        preset = p.get_default("preset")
        show_defaults(p, cls, presets[preset], f"{preset} preset")
    a = p.parse_args(argv)
    for name, value in vars(a).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    a.given = {name for name, value in vars(a).items() if value != p.get_default(name)}
    return a if cls is None else (a, settings(a, cls, presets))


def check_used(a, **uses):
    """A flag the user gave that this command would ignore is one line, not a silent default: `uses`
    maps a flag's name to (whether this command uses it, when it applies)."""
    for name, (used, when) in uses.items():
        if name in a.given and not used:
            raise UserError(f"--{name.replace('_', '-')} applies {when}; this command would ignore it")


def settings(a, cls, presets):
    """The settings of a run: the preset's, then every flag the user gave (flags default to None)."""
    values = dict(presets[a.preset])
    values.update({f.name: getattr(a, f.name) for f in fields(cls) if getattr(a, f.name, None) is not None})
    return cls(**values)


# ----------------------------------------------------------------------------- checks at the edge

def check_positive(**sizes):
    """Sizes and counts a user gives, each > 0, as one line naming the flag."""
    for name, value in sizes.items():
        if value is None or not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_nonnegative(**values):
    for name, value in values.items():
        if value is None or not value >= 0:
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


def check_settings(cfg, positive=(), nonnegative=()):
    """Every float setting finite; learning rate, schedule, AdamW, clipping and init-std in range; the
    seed; the named `positive` and `nonnegative` settings: one line naming the flag, before any work
    (AdamW's own complaint would come only after the data and the model had loaded, and inf would
    train to NaN)."""
    check_positive(**{name: getattr(cfg, name) for name in positive})
    check_nonnegative(**{name: getattr(cfg, name) for name in nonnegative})
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    for name, (allowed, ok) in OPTIMIZER_RANGES.items():
        if hasattr(cfg, name) and not ok(getattr(cfg, name)):
            raise UserError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(cfg, name)}")
    if hasattr(cfg, "seed"):
        check_seed(cfg.seed)


def check_interval(t0, t1, trains=True):
    """The mask-ratio interval as the user gave it. A training run needs t1 > 0: with t = 0 nothing is
    masked, the loss and its gradient are 0 and the run would learn nothing while looking fine."""
    import masking
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
