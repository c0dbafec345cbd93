"""
Many runs of one script (parity.py --compare and --ladder, wikitext.py --sweep): one queue of jobs
over workers, each worker a CPU process of one thread or a GPU, and the folder that collects them.
The experiment file keeps only its science (which configurations, the table, the figure):

    with Collection(out_dir, "parity.py --compare", settings) as folder:    # claimed and locked
        folder.check([(run_dir, settings_of_that_run), ...])                # finished runs reusable?
        run_jobs(train_one, jobs, devices)                                  # every run, once
        folder.finish(summary)                                              # the table, last

Each job is the script's own single run (a Run), so a finished run is found `done` and reused and an
interrupted one resumes from its checkpoint.
"""
import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from dataclasses import asdict

from machinery import files, run as runs
from machinery.cli import Interrupted, UserError, _on_sigterm


def devices_for(device, jobs):
    """The workers: every visible GPU when the device is CUDA (one run each), else `jobs` CPU processes."""
    import torch
    if device.startswith("cuda") and ":" not in device:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device] * (jobs if device == "cpu" else 1)


def run_jobs(fn, jobs, devices, on_result=None):
    """fn(*job, device=d) for every job, at most len(devices) at a time, each in a process of its own on
    a device of its own (a CPU process runs one thread); with one device, in this process, one after
    another. on_result(value) sees each run's return value as it finishes. A run's one-line error
    stops the sweep with that line, a bug with its traceback; either way, and on Ctrl-C or SIGTERM,
    the finished runs are kept and the unfinished ones keep their checkpoints."""
    on_result = on_result or (lambda value: None)
    if len(devices) == 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(fn(*job, device=devices[0]))
        return
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    waiting, running, free = list(enumerate(jobs)), {}, list(devices)
    try:
        while waiting or running:
            while waiting and free:
                (i, job), device = waiting.pop(0), free.pop(0)
                p = ctx.Process(target=_work, args=(fn, job, device, i, results, devices.count("cpu") > 1),
                                daemon=True)
                p.start()
                running[i] = (p, device)
            try:
                i, kind, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [(i, p) for i, (p, _) in running.items() if p.exitcode not in (None, 0)]
                if dead:
                    raise UserError(f"a run of the sweep ended without a word (exit code {dead[0][1].exitcode}: "
                                    f"killed, or out of memory?); the finished runs are kept and the others keep "
                                    f"their checkpoints: run the same command again")
                continue
            p, device = running.pop(i)
            p.join()
            free.append(device)
            if kind == "user":
                raise UserError(payload)
            if kind == "bug":
                raise RuntimeError(f"a run of the sweep failed:\n{payload}")
            if kind == "stopped":
                raise KeyboardInterrupt
            on_result(payload)
    except BaseException:
        for p, _ in running.values():
            p.terminate()                 # SIGTERM: the run's Run releases its folder, its checkpoint stays
        for p, _ in running.values():
            p.join(timeout=60)
        raise


def _work(fn, job, device, index, results, one_thread):
    """A worker process: one run, its outcome sent to the parent as (index, kind, payload)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    if one_thread:
        import torch
        torch.set_num_threads(1)
    try:
        results.put((index, "ok", fn(*job, device=device)))
    except UserError as e:
        results.put((index, "user", str(e)))
    except (KeyboardInterrupt, Interrupted):
        results.put((index, "stopped", None))
    except Exception:
        results.put((index, "bug", traceback.format_exc()))


class Collection:
    """A folder of runs of one kind and their table. Claimed before any run starts: refused where
    another script's (or another kind of) run lives, since its summary would be written over; one
    writer at a time. Marked as `kind`'s (run.json) only once check() has passed, so a refused
    sweep leaves the folder as it was."""

    def __init__(self, out_dir, kind, settings):
        self.out_dir, self.kind, self.settings = out_dir, kind, settings
        self._lock, self._created = None, []

    def __enter__(self):
        owner = runs.folder_owner(self.out_dir)
        if owner not in (None, self.kind):
            raise UserError(f"--out-dir {self.out_dir} holds a run of {owner}, not of {self.kind}; choose another "
                            f"--out-dir")
        self._created = runs.prepare_out_dir(self.out_dir)
        try:
            self._lock = runs.lock_out_dir(self.out_dir)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, kind, e, tb):
        if self._lock is not None:
            runs.unlock(*self._lock)
        if isinstance(e, (KeyboardInterrupt, Interrupted)):
            e.note = (f"every finished run in {self.out_dir} is kept, and each unfinished one keeps its last "
                      f"checkpoint; continue with: python {' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}")
        elif e is not None:
            for path in self._created:
                try:
                    os.rmdir(path)
                except OSError:
                    break
        return False

    def path(self, *parts):
        return os.path.join(self.out_dir, *parts)

    def run(self, fn, jobs, device, workers=1, ignore=(), allow_change=(), inputs=None, on_result=None):
        """Every job (cfg, run folder, *more) trained once by fn(*job, device=d), `workers` CPU processes (or
        every visible GPU) at a time: a finished run with these settings and inputs (inputs(cfg): what
        Run would fingerprint) is reused, never retrained; one with others is refused, before any run
        starts, unless --allow-change names the settings (the job then extends it: fn resumes it)."""
        self.check([(job[1], asdict(job[0]), inputs(job[0]) if inputs else {}) for job in jobs], ignore,
                   allow_change)
        todo = [job for job in jobs if not self.holds_finished(job[1], asdict(job[0]), ignore)]
        devices = devices_for(device, workers)
        print(f"{self.kind}: {len(jobs)} runs ({len(jobs) - len(todo)} already done), {len(devices)} at a time",
              flush=True)
        run_jobs(fn, todo, devices, on_result)

    def holds_finished(self, run_dir, settings, ignore):
        """A finished run with these settings (a summary without settings counts as finished: never
        retrained, nothing written over)."""
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            return False
        done = runs.finished_summary(run_dir)
        return done is None or runs.same_settings(done["settings"], settings, ignore)

    def check(self, planned, ignore=(), allow_change=()):
        """Every planned (run folder, settings, inputs' fingerprints) that holds a finished run must hold it
        with those very settings (bookkeeping `ignore` aside; those --allow-change names may differ: the
        run is then extended) and inputs: it is reused, never retrained; another one is refused. Then
        the folder is marked as this collection's."""
        for run_dir, settings, inputs in planned:
            done = runs.finished_summary(run_dir)
            if done is None:
                continue
            if not runs.same_settings(done["settings"], settings, tuple(ignore) + tuple(allow_change)):
                raise UserError(f"{run_dir} holds a finished run with other settings; choose another --out-dir (or "
                                f"--allow-change the settings to extend it)")
            changed = runs.changed_inputs(done, {k: files.fingerprint(v) for k, v in inputs.items()})
            if changed:
                raise UserError(f"{run_dir} holds a finished run on other {' and '.join(changed)} (changed since); "
                                f"choose another --out-dir")
        files.write_json(self.path(runs.RUN_FILE), dict(script=self.kind, settings=self.settings))

    def finished(self, settings, vary, ignore=()):
        """(run folder, summary) of every finished run in the folder whose settings are `settings` but for
        the keys in `vary` (bookkeeping `ignore` aside), in name order: what an earlier command of this
        collection trained, so that its table holds the union of the runs, never a subset."""
        out = []
        for name in sorted(os.listdir(self.out_dir)):
            done = runs.finished_summary(self.path(name))
            if done is not None and runs.same_settings(done["settings"], settings, tuple(vary) + tuple(ignore)):
                out.append((self.path(name), done))
        return out

    def finish(self, name, summary):
        """The collection's table (`name`, a JSON file), written whole, last."""
        files.write_json(self.path(name), dict(script=self.kind, **summary))
