"""
A run, behind one object: its folder, its checkpoints, its log and its summary, and, under torchrun,
its place among the processes.

    with Run("parity.py", cfg, out_dir, resume=a.resume) as run:
        if run.done:                                     # this very command finished already
            return run.finished()
        ...                                              # data, model, optimizer
        saved = run.restore(model=model, opt=opt, gen=gen)   # the checkpoint's state, or None
        for step in ...:
            ...                                          # the step
            run.log(text, **record)                      # printed on rank 0, kept in the history
            run.save(step, model=model, opt=opt, gen=gen)
        run.finish(summary)                              # summary.json (and history.json), last

The rules it keeps, so that nothing a user had is lost and nothing wrong is written as if right:
  - A folder belongs to the run that made it (run.json: script and settings). A fresh run into an
    earlier run's folder is refused, and any run into another script's; the same finished command
    again is `done` (its result is reported, nothing is written); --resume continues this script's
    unfinished run. One writer at a time (a lock naming its process; a dead one's is taken over).
  - A run is its settings and the content of its inputs (files.fingerprint): --resume, `done` and a
    sweep's reuse all require both unchanged, unless --allow-change names what changed.
  - Nothing is written before the run's first result: run.json comes with the first checkpoint,
    log record or summary, so a refused command leaves the folder as it was (and removes again a new
    folder it made).
  - Ctrl-C or SIGTERM inside the run: its line names the last complete checkpoint and the command
    that continues (cli.run_cli prints it).
"""
import atexit
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, is_dataclass

import numpy as np
import torch

from machinery import distributed, files
from machinery.cli import Interrupted, UserError, resume_command

RUN_FILE = "run.json"        # {"script": ..., "settings": ...}: which script's run a folder holds
LOCK_FILE = ".lock"          # {"pid": ..., "host": ...}: the process writing the folder now
RUN_MARKERS = ("summary.json", "ckpt.pt", "history.json", "log.jsonl", "export", "tasks", "results", "results.md")


class Run:
    """One run of `script` with `settings` (a dataclass or dict) into `out_dir`.

    resume        continue the folder's own unfinished run (none yet: a fresh one, said in a line)
    allow_change  settings, or names of inputs, that --resume may find changed (recorded in the summary)
    bookkeeping   settings that never make another run (logging and checkpoint cadence, threads)
    inputs        {name: path or list of paths or Hub name} the run reads, or a function returning
                  it (called on rank 0 once the processes have met): their fingerprints are the run's
    checkpoints   FileCheckpoint() (ckpt.pt, the default), fsdp.ShardedCheckpoints, or Partial
    torchrun      set up the processes torchrun launched (a plain process: a world of one) on `device`,
                  every wait bounded by `timeout_s`
    dry_run       build and step, write nothing; quiet: print nothing
    log_file      append every record to OUT_DIR/log.jsonl as well
    report        summary keys the line of a finished command run again shows ("test_loss", ...)
    resumable     False for a script without --resume (theory.py): an earlier run is refused without
                  suggesting it
    """

    def __init__(self, script, settings, out_dir, *, resume=False, allow_change=(), bookkeeping=(), inputs=None,
                 checkpoints=None, torchrun=False, device="cpu", timeout_s=600.0, backend=None, dry_run=False,
                 quiet=False, log_file=False, report=(), resumable=True):
        self.script, self.out_dir = script, out_dir
        self.settings = asdict(settings) if is_dataclass(settings) else dict(settings)
        self.resume, self.allow_change, self.bookkeeping = resume, tuple(allow_change), tuple(bookkeeping)
        self.checkpoints = checkpoints or FileCheckpoint()
        self.torchrun, self.backend, self.timeout_s = torchrun, backend, timeout_s
        self.world = distributed.World(device=device)
        self.dry_run, self.quiet, self.log_file, self.report = dry_run, quiet, log_file, report
        self.resumable = resumable
        self._inputs_spec, self.inputs = inputs, {}
        self.state, self.latest = None, None          # "fresh" | "resume" | "done"; the checkpoint resumed
        self.history, self.changes, self.step = [], {}, 0
        self._seconds, self._clock, self._start_step = 0.0, time.time(), 0
        self._marked, self._lock, self._created = False, None, []

    # ------------------------------------------------------------------------- entering and leaving

    def __enter__(self):
        try:
            if self.torchrun:
                self.world = distributed.setup(self.world.device, self.timeout_s, self.backend)
            self.checkpoints.bind(self)
            if self.dry_run:
                self.state = "fresh"
            else:
                decided = distributed.on_every_rank(lambda: self._claim() if self.master else None, self.world)
                self.state, self.inputs, self.latest = distributed.broadcast(decided, self.world)
                if self.state != "done":
                    self._check_shared()
                elif self.master and not self.quiet:
                    print(done_line(self.out_dir, self.report), flush=True)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, kind, e, tb):
        try:
            if isinstance(e, (KeyboardInterrupt, Interrupted)) and getattr(e, "note", None) is None \
                    and self.state in ("fresh", "resume") and not self.dry_run:
                e.note = f"{self.checkpoint_note()}; continue with: {resume_command()}"
            self.checkpoints.close(failed=e is not None)
        finally:
            self._release()
            if e is not None:
                for path in self._created:       # a refused or failed run leaves no empty folder it made
                    try:
                        os.rmdir(path)
                    except OSError:
                        break
            if self.torchrun:
                distributed.teardown()
        return False

    @property
    def master(self):
        return self.world.rank == 0

    @property
    def device(self):
        return self.world.device

    @property
    def done(self):
        return self.state == "done"

    # ------------------------------------------------------------------------- the folder

    def _fingerprints(self):
        spec = self._inputs_spec() if callable(self._inputs_spec) else (self._inputs_spec or {})
        return {name: files.fingerprint(source) for name, source in spec.items()}

    def _claim(self):
        """Rank 0, before any work and before anything is written: what this run may do with its folder
        ("fresh", "resume" or "done"), its inputs' fingerprints and the checkpoint to resume."""
        inputs = self._fingerprints()
        state = claim_out_dir(self.out_dir, self.script, self.settings, inputs, resume=self.resume,
                              has_checkpoint=self.checkpoints.latest() is not None, ignore=self.bookkeeping,
                              resumable=self.resumable)
        latest = None
        if state == "resume":
            latest = self.checkpoints.latest()
            self._check_resumable(latest, self.checkpoints.read(latest), inputs)
        if state != "done":
            self._created = prepare_out_dir(self.out_dir)
            self._lock = lock_out_dir(self.out_dir)
        return state, inputs, latest

    def _check_resumable(self, path, saved, inputs):
        """--resume: the checkpoint is one this run may continue, written with these settings and inputs
        (or ones --allow-change names), and short of --max-steps."""
        if saved is None:
            return
        if saved.get("model_only"):
            raise UserError(f"checkpoint {path} holds the model only (the last save of a finished run, "
                            f"--last-save-model-only): export or evaluate it; it cannot be resumed")
        changes = check_resume_settings(saved["config"], self.settings, path, self.allow_change, self.bookkeeping)
        changed = [k for k, v in (saved.get("inputs") or {}).items() if k in inputs and inputs[k] != v]
        refused = [k for k in changed if k not in self.allow_change]
        if refused:
            names = " and ".join(refused)
            raise UserError(f"--resume: the {names} changed since {path} was written (other content under the "
                            f"same paths); resume with the {names} it was trained on, or pass --allow-change "
                            f"{' '.join(refused)}")
        steps = self.settings.get("max_steps")
        if steps is not None and saved["step"] > steps:
            raise UserError(f"--resume: {path} is at step {saved['step']}, past --max-steps {steps}: nothing to "
                            f"train; resume with --max-steps {saved['step']} or more")
        self.changes = {**saved.get("changes", {}), **changes, **{k: "changed" for k in changed}}

    def _check_shared(self):
        """Every rank must see --out-dir (on several nodes: one shared file system), or each node would
        write checkpoints of its own that no restart could assemble: rank 0 writes a probe file, every
        rank looks for it."""
        if self.world.size == 1 or self.dry_run:
            return
        name = distributed.broadcast(f".probe-{uuid.uuid4().hex}", self.world)
        path = os.path.join(self.out_dir, name)
        distributed.on_every_rank(lambda: open(path, "w").close() if self.master else None, self.world)

        def look():
            if not os.path.exists(path):
                raise UserError(f"--out-dir {self.out_dir} is not seen by every rank (rank {self.world.rank} on "
                                f"{os.uname().nodename} does not find {name} that rank 0 wrote): put it on a file "
                                f"system every node shares")
        try:
            distributed.on_every_rank(look, self.world)
        finally:
            if self.master and os.path.exists(path):
                os.remove(path)

    def _mark(self):
        """run.json, with the first thing this run writes: the folder now holds this script's run."""
        if not self._marked and self.master and not self.dry_run:
            files.write_json(os.path.join(self.out_dir, RUN_FILE), dict(script=self.script, settings=self.settings,
                                                                        inputs=self.inputs))
            self._marked = True

    def _release(self):
        if self._lock is not None:
            unlock(*self._lock)
            self._lock = None

    def path(self, *parts):
        return os.path.join(self.out_dir, *parts)

    def write_json(self, name, obj):
        """A result file of this run (rank 0), written whole; the folder is marked as this run's first."""
        if self.master and not self.dry_run:
            self._mark()
            os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
            files.write_json(self.path(name), obj)

    def write_text(self, name, text):
        if self.master and not self.dry_run:
            self._mark()
            files.write_text(self.path(name), text)

    # ------------------------------------------------------------------------- the run's life

    def restore(self, **objects):
        """The checkpoint's state into `objects` (modules, optimizers, generators, data streams: anything
        with load_state_dict, or a torch.Generator), its history, seconds and the global RNGs; returns
        what else it holds (the step, and whatever save() was given), or None for a fresh run."""
        saved = None
        if self.state == "resume":
            saved = self.checkpoints.load(self.latest, objects)
            if "rng" in saved:
                set_rng_state(saved["rng"])
            self.step, self.history, self._seconds = saved["step"], saved.get("history", []), saved.get("seconds", 0.0)
            changed = f" with settings changed knowingly: {self.changes}" if self.changes else ""
            self.log(f"resumed {self.latest} at step {self.step}{changed}", resumed=self.step)
        self._clock, self._start_step = time.time(), self.step
        return saved

    def log(self, text=None, **record):
        """`text` printed by rank 0 (unless quiet); `record` kept in the history when it has a step (saved
        with every checkpoint), and appended to OUT_DIR/log.jsonl when the run keeps one."""
        if self.master and not self.quiet and text is not None:
            print(text, flush=True)
        if not record:
            return
        if "step" in record:
            self.history.append(record)
        if self.log_file and self.master and not self.dry_run:
            self._mark()
            path = self.path("log.jsonl")
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise files.write_failure(path, e, self.checkpoint_note()) from None

    def save(self, step, **objects):
        """A checkpoint of step `step`: each object's state (modules, optimizers, generators; other values as
        they are), with the settings, inputs, history, seconds and RNGs, written whole or not at all."""
        if self.dry_run:
            return
        self.checkpoints.check(step, objects)    # weights that hold NaN or inf are never written
        self._mark()
        state = dict(step=step, config=self.settings, inputs=self.inputs, changes=self.changes, history=self.history,
                     seconds=self.seconds(), rng=rng_state())
        self.checkpoints.save(step, state, objects)
        self.step = step

    def complete_checkpoints(self):
        """Wait until the checkpoints written asynchronously are complete on disk (a failed write is one
        line here, naming the last complete one)."""
        self.checkpoints.wait()

    def seconds(self):
        """Seconds this run has trained, over all its resumptions."""
        return self._seconds + time.time() - self._clock

    def eta(self, step, total):
        done = step - self._start_step
        elapsed = time.time() - self._clock
        left = (total - step) * elapsed / done if done > 0 else float("nan")
        return f"{elapsed:.0f}s elapsed, ETA {left:.0f}s"

    def checkpoint_note(self):
        return self.checkpoints.note()

    def finish(self, summary):
        """summary.json (and history.json), written last: a folder holding it holds a finished run. The
        summary names the script, settings and inputs, and the settings changed on resume. Returns it."""
        self.checkpoints.close()
        summary = dict(script=self.script, settings=self.settings, inputs=self.inputs, **summary)
        if self.changes:
            summary["changed_on_resume"] = self.changes          # {setting: [checkpoint's, now]}
        if self.master and not self.dry_run:
            self._mark()
            if self.history and not self.log_file:       # with a log file, the history is in it
                files.write_json(self.path("history.json"), self.history)
            files.write_json(self.path("summary.json"), summary)
        return summary

    def finished(self):
        """(summary, history) of the finished run already in the folder, the summary marked done."""
        with open(self.path("summary.json")) as f:
            summary = json.load(f)
        history = []
        if os.path.exists(self.path("history.json")):
            with open(self.path("history.json")) as f:
                history = json.load(f)
        return dict(summary, done=True), history


    # ------------------------------------------------------------------------- every rank

    def together(self):
        """A block every rank runs; a failure on any rank stops all of them with one line (distributed.agree)."""
        return distributed.together(self.world.control)

    def broadcast(self, value):
        return distributed.broadcast(value, self.world)

    def rank0(self, fn):
        """fn() on rank 0 alone, its value on every rank (its failure stops every rank)."""
        return distributed.rank0(fn, self.world)


# ----------------------------------------------------------------------------- checkpoints of one file

class FileCheckpoint:
    """OUT_DIR/ckpt.pt: everything a run of one process (or DDP, rank 0 writing) carries from step to
    step, in one torch.save, written whole or not at all."""

    def __init__(self, name="ckpt.pt"):
        self.name, self.saved_step = name, None

    def bind(self, run):
        self.path, self.run = os.path.join(run.out_dir, self.name), run

    def latest(self):
        return self.path if os.path.exists(self.path) else None

    def read(self, path):
        return files.load_checkpoint(path)

    def load(self, path, objects):
        saved = self.read(path)
        for name, obj in objects.items():
            if isinstance(obj, torch.Generator):
                obj.set_state(saved[name])
            else:
                files.restore(obj, saved[name], path)
            if isinstance(obj, torch.nn.Module) and not finite(obj):
                raise UserError(f"checkpoint {path} holds NaN or inf weights: it cannot be resumed (delete it, or "
                                f"choose another --out-dir)")
        self.saved_step = saved["step"]
        return saved

    def check(self, step, objects):
        for obj in objects.values():
            if isinstance(obj, torch.nn.Module) and not finite(obj):
                raise UserError(f"the weights hold NaN or inf at step {step}: not saved. "
                                f"{self.note().capitalize()}; lower --lr, or check the data")

    def save(self, step, state, objects):
        if not self.run.master:
            return
        state.update({name: state_of(obj) for name, obj in objects.items()})
        files.atomic_torch_save(state, self.path, note=self.note())
        self.saved_step = step

    def note(self):
        return f"the last complete checkpoint is {self.path}" + (f" (step {self.saved_step})" if self.saved_step
                                                                 is not None else " (none yet)")

    def wait(self):
        pass

    def close(self, failed=False):
        pass


class Partial:
    """The "checkpoint" of a run whose results are written one by one (eval_8b.py's tasks): the folder
    `name` holding at least one of them. --resume continues such a run; each result is checked against
    its own settings by the script, so there is nothing to read here."""

    def __init__(self, name):
        self.name = name

    def bind(self, run):
        self.path = os.path.join(run.out_dir, self.name)

    def latest(self):
        return self.path if os.path.isdir(self.path) and os.listdir(self.path) else None

    def read(self, path):
        return None

    def load(self, path, objects):
        return {"step": 0}

    def note(self):
        return f"the results scored so far are in {self.path}"

    def check(self, step, objects):
        pass

    def save(self, step, state, objects):
        raise RuntimeError("results are written one by one with run.write_json")

    def wait(self):
        pass

    def close(self, failed=False):
        pass


def done_line(out_dir, summary_keys=()):
    """The line a finished command run again prints: where its result is."""
    path = os.path.join(out_dir, "summary.json")
    with open(path) as f:
        s = json.load(f)
    shown = ", ".join(f"{k} {s[k]:.4g}" if isinstance(s.get(k), float) else f"{k} {s.get(k)}"
                      for k in summary_keys if k in s)
    return f"{out_dir} already holds this run, finished" + (f" ({shown})" if shown else "") + \
        f": see {path} (another --out-dir for a new run)"


def finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


def state_of(obj):
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def rng_state():
    """The global RNGs (python, numpy, torch, CUDA), so a resumed run continues bit-identically."""
    import random
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import random
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- folder rules

def prepare_out_dir(path):
    """Create --out-dir now and prove it writable, so that a path that is a file, or lies under one, or
    cannot be written, is a one-line error before any work starts. Returns the folders it created,
    leaf first (removed again if the run is refused)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out-dir {path} exists and is not a folder")
    created, new = [], os.path.abspath(path)
    while new != os.path.dirname(new) and not os.path.exists(new):
        created.append(new)
        new = os.path.dirname(new)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out-dir {path} cannot be written ({e.strerror or type(e).__name__})") from None
    return created


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


def finished_summary(out_dir):
    """The summary.json of the finished run in out_dir, or None."""
    path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (ValueError, OSError):
        return None
    return summary if isinstance(summary, dict) and "settings" in summary else None


def changed_inputs(summary, inputs):
    """Names of the inputs whose fingerprint differs from the one the summary (or run.json) recorded."""
    saved = summary.get("inputs") or {}
    return [k for k, v in saved.items() if k in inputs and inputs[k] != v]


def claim_out_dir(out_dir, script, settings, inputs, *, resume, has_checkpoint, ignore=(), resumable=True):
    """What this run may do with --out-dir, decided before any work and before anything is written:

      "fresh"  - the folder is new or empty (with --resume: said, so a mistyped --out-dir shows),
                 or holds this script's unfinished run that saved no checkpoint yet, and --resume;
      "resume" - it holds this script's checkpoint and --resume was given;
      "done"   - it holds this script's finished run with these very settings and inputs: the caller
                 says where the result is and writes nothing (re-running a finished command is harmless).

    Everything else is refused in one line: a folder holding another script's run; an earlier run
    without --resume; a finished run whose inputs changed; --resume of a finished run that left no
    checkpoint. Nothing a user had is ever overwritten."""
    owner = folder_owner(out_dir)
    if owner is None:
        if resume:
            print(f"--resume: no checkpoint in {out_dir} yet; starting a fresh run", flush=True)
        return "fresh"
    if owner != script:
        raise UserError(f"--out-dir {out_dir} holds a run of {owner}, not of {script}; choose another --out-dir")
    done = finished_summary(out_dir)
    if done is not None and same_settings(done["settings"], settings, ignore):
        changed = changed_inputs(done, inputs)
        if not changed:
            return "done"
        raise UserError(f"--out-dir {out_dir} holds this run, finished on other {' and '.join(changed)} (changed "
                        f"since); its result does not hold for the {' and '.join(changed)} now: choose another "
                        f"--out-dir")
    if not resume:
        raise UserError(f"--out-dir {out_dir} holds an earlier run of {script}" + (
            "; pass --resume to continue it, or choose another --out-dir" if resumable else
            " with other settings; choose another --out-dir (nothing is written over it)"))
    if has_checkpoint:
        return "resume"
    if done is not None:
        raise UserError(f"--resume: {out_dir} holds a finished run with other settings and no checkpoint to continue "
                        f"from; choose another --out-dir")
    print(f"--resume: no checkpoint in {out_dir} yet; starting a fresh run", flush=True)
    return "fresh"


def check_resume_settings(saved, now, path, allow=(), ignore=()):
    """--resume with settings that change the run is refused, naming them: the run would otherwise be
    labelled with settings it was not trained with. `allow` (--allow-change) lets named settings
    differ; `ignore` are bookkeeping. Returns {name: [old, new]} of the allowed changes."""
    differ = {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v and k not in ignore}
    refused = [k for k in differ if k not in allow]
    if refused:
        shown = ", ".join(f"{k} {differ[k][0]!r} -> {differ[k][1]!r}" for k in refused)
        raise UserError(f"--resume: {path} was written with other settings ({shown}); resume with its settings, "
                        f"or pass --allow-change {' '.join(refused)} to change them knowingly")
    return differ


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
    same folder is refused while the first lives; a lock left by a dead process on this host, or an
    empty or unreadable one (a writer killed while taking it), is taken over. Returns (path, owner)."""
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
            stale = not isinstance(other, dict) or not other.get("pid") or (
                other.get("host") == me["host"] and not pid_alive(int(other["pid"])))
            if stale:
                with contextlib.suppress(OSError):
                    os.remove(path)
                continue
            if other == me:
                return path, me
            raise UserError(f"--out-dir {out_dir} is being written by another run (pid {other.get('pid')} on "
                            f"{other.get('host')}); wait for it, or choose another --out-dir (if that run is gone, "
                            f"delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(unlock, path, me)
        return path, me
    raise UserError(f"--out-dir {out_dir}: could not take its lock {path}")


def unlock(path, me):
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            if json.load(f) == me:
                os.remove(path)
