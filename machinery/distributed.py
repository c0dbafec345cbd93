"""
torchrun, with every wait bounded and every failure agreed on. nanoGPT's dozen lines (detect torchrun
from the environment, one process per GPU, rank 0 logs and saves) plus what surviving a real cluster
takes: a rendezvous and collectives that time out after --dist-timeout (a lost rank becomes an error
torchrun can restart from, not a hang), stale launcher variables refused in one line, and `agree`,
by which a failure on any rank stops every rank with the same line, none left waiting in a collective.
"""
import contextlib
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from machinery.cli import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class World:
    """This process's place among the processes of a run. `control` is a gloo group for CPU flags
    (errors, lengths, data positions): it never waits on a GPU queue."""
    rank: int = 0
    size: int = 1
    device: str = "cpu"
    control: object = None
    timeout_s: float = 600.0


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


def setup(device, timeout_s=600.0, backend=None):
    """One process per GPU under torchrun (NCCL; gloo on CPUs); a plain `python` run is a world of one
    (gloo over a local port), so the same code runs everywhere. Every group waits at most `timeout_s`
    (rendezvous included). Returns the World."""
    if not timeout_s > 0:
        raise UserError(f"--dist-timeout must be positive, got {timeout_s}")
    torchrun = torchrun_environment()
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torchrun else (device if ":" in device else "cuda:0")
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
    control = dist.new_group(backend="gloo", timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), device, control, timeout_s)


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
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- every rank agrees

def broadcast(value, world):
    """Rank 0's value on every rank (over gloo): what rank 0 alone may decide, such as which checkpoint
    to resume or what a folder holds."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=world.control)
    return box[0]


def failure_of(e):
    """(kind, text) of an exception for agree(): a UserError's message, or a bug's traceback."""
    if isinstance(e, UserError):
        return ("user", str(e))
    return ("bug", "".join(traceback.format_exception(e)))


def agree(failure, group):
    """Every rank says whether it failed (None, or failure_of(e)); if any did, every rank stops: with
    the first user error's one line (raised as UserError on every rank), or, for a bug, its traceback
    printed once by rank 0 and status 1 everywhere. One all-reduce of a CPU flag when all is well,
    so no rank is ever left waiting in a collective another rank will not reach."""
    if group is None or dist.get_world_size(group) == 1:
        return
    flag = torch.tensor([0.0 if failure is None else 1.0])
    dist.all_reduce(flag, group=group)
    if not flag.item():
        return
    failures = [None] * dist.get_world_size(group)
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


@contextlib.contextmanager
def together(group):
    """The block runs on every rank and its failures are agreed on by all of them (agree): a rank that
    fails stops the others at the end of the block, not in their next collective. In a world of one
    the exception propagates as it is."""
    if group is None or dist.get_world_size(group) == 1:
        yield
        return
    failure = None
    try:
        yield
    except Exception as e:
        failure = failure_of(e)
    agree(failure, group)


def rank0(fn, world):
    """fn() on rank 0 alone, its value on every rank (a failure on rank 0 stops every rank): what one
    process decides for all, such as a file listing or a memory plan."""
    return broadcast(on_every_rank(lambda: fn() if world.rank == 0 else None, world), world)


def on_every_rank(fn, world):
    """fn() on every rank, its failures agreed on (together); returns its value."""
    out = None
    with together(world.control):
        out = fn()
    return out


def gather(value, world):
    """Every rank's value, in rank order, on every rank (over gloo)."""
    if world.size == 1:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value, group=world.control)
    return out
