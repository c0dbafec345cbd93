"""Fault injection for the torchrun tests: runs a script's main() with one fault planted on one rank,
chosen by environment variables, so that the product code carries no test hooks.

    python -m torch.distributed.run ... tests/fault.py pretrain_8b.py ARGS...   (FAULT=kill-at-step ...)

FAULT=kill-at-step  FAULT_STEP=N FAULT_AFTER=PATH FAULT_MARKER=PATH: the rank kill -9s itself when its
                    data for step >= N is drawn and PATH (a complete checkpoint) exists, once (MARKER)
FAULT=slow          FAULT_SECONDS=S: the rank's first loglikelihood call waits S seconds first
FAULT=user-error    the rank's first loglikelihood call raises a UserError
FAULT=bug           the rank's first loglikelihood call raises a ZeroDivisionError (a bug)
FAULT=fail-call     FAULT_CALL=N: the rank's N-th loglikelihood call (N-th task) raises a UserError, once (MARKER)
FAULT=hide-probe    the rank does not see --out-dir's probe file (a node without the shared file system)
"""
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machinery import cli  # noqa: E402

script = sys.argv[1]
sys.argv = [os.path.join(ROOT, script)] + sys.argv[2:]
module = __import__(script.removesuffix(".py"))
fault = os.environ.get("FAULT", "")
mine = int(os.environ.get("RANK", "0")) == int(os.environ.get("FAULT_RANK", "1"))


def once():
    marker = os.environ.get("FAULT_MARKER")
    if marker is None:
        return True
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


if fault == "kill-at-step" and mine:
    real_length = module.sequence_length
    step_at, after = int(os.environ["FAULT_STEP"]), os.environ["FAULT_AFTER"]

    def sequence_length(step, cfg):
        if step >= step_at and os.path.isdir(after) and once():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_length(step, cfg)
    module.sequence_length = sequence_length

if fault in ("slow", "user-error", "bug", "fail-call") and mine:
    lm = module.MaskedDiffusionLM
    real = lm._loglikelihood
    calls = []

    def _loglikelihood(self, requests):
        calls.append(1)
        if fault == "slow" and len(calls) == 1:
            time.sleep(float(os.environ["FAULT_SECONDS"]))
        if fault == "user-error" and len(calls) == 1:
            raise cli.UserError("planted on rank 1: an answer that does not fit")
        if fault == "bug" and len(calls) == 1:
            return 1 / 0
        if fault == "fail-call" and len(calls) == int(os.environ["FAULT_CALL"]) and once():
            raise cli.UserError("planted: this task failed")
        return real(self, requests)
    lm._loglikelihood = _loglikelihood

if fault == "hide-probe" and mine:
    real_exists = os.path.exists
    os.path.exists = lambda p: False if ".probe-" in str(p) else real_exists(p)

cli.run_cli(module.main)
