"""
Files a run reads and writes: written whole or not at all (write, then rename), read with one line
naming the file when it is missing, unreadable or not what it should be, and identified by their
content (a fingerprint) so that a run never mixes results of one input with another.
"""
import contextlib
import errno
import hashlib
import json
import os

import torch

from machinery.cli import UserError


# ----------------------------------------------------------------------------- writing

def write_failure(path, e, note=None):
    """A write that failed for the disk's reasons (full, file too large, read-only, gone) as one line;
    `note` says what is still intact (a run's last complete checkpoint)."""
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:120]
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or not isinstance(e, OSError)
    return UserError(f"could not write {path} ({reason})" + ("; free space on that disk, or choose another --out-dir"
                                                             if full else "")
                     + (f"; {note}, intact: continue with --resume" if note else ""))


def is_write_failure(e):
    """torch.save reports a failed write as a RuntimeError of its zip writer; the OS as OSError."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and ("write" in str(e) or "inline_container"
                                                                       in str(e)))


@contextlib.contextmanager
def atomic_path(path, note=None):
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
            raise write_failure(path, e, note) from None
        raise


def atomic_torch_save(obj, path, note=None):
    """Write then rename: a crash mid-write never leaves a half checkpoint behind."""
    with atomic_path(path, note) as tmp:
        torch.save(obj, tmp)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def write_text(path, text):
    """Write then rename: a reader never sees half a file, and a failure leaves the old one."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- reading what a user gives

def decode_error(path, data, e, what):
    """A file that is not UTF-8, as one line naming the line it breaks on."""
    line = 1 + data[:e.start].count(b"\n")
    return UserError(f"{what} {path} is not UTF-8 text (line {line}, byte {e.start})")


def read_text(path, what):
    """The UTF-8 text of a user-given file; missing, unreadable or binary is one line naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise decode_error(path, data, e, what) from None


def check_utf8(path, what):
    """A text file is UTF-8 throughout, else one line naming the line it breaks on (read in blocks:
    the file may be large)."""
    line, offset, carry = 1, 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(2 ** 22)
            data = carry + block
            if not data:
                return
            try:
                data.decode("utf-8")
                good, carry = data, b""
            except UnicodeDecodeError as e:
                if block and e.reason == "unexpected end of data" and e.start >= len(data) - 3:
                    good, carry = data[:e.start], data[e.start:]        # a character cut by the block's end
                else:
                    at = line + data[:e.start].count(b"\n")
                    raise UserError(f"{what} {path} is not UTF-8 text (line {at}, byte {offset + e.start})") from None
            line, offset = line + good.count(b"\n"), offset + len(good)


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
    """torch.load a checkpoint to the CPU (RNG states must stay CPU tensors). A truncated or corrupt
    file is the user's to fix, so it is a one-line error naming the file."""
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


# ----------------------------------------------------------------------------- what identifies an input

HASHED_BYTES = 64 * 2**20       # files up to this size are identified by all of their bytes


def fingerprint(source, content=True):
    """What identifies an input, so that a run is never resumed, reused or reported over other data.
    A file: its size and its bytes (a SHA-1 of them; past HASHED_BYTES, of its first and last
    megabyte with its modification time). content=False: its size and modification time alone
    (DCLM's thousands of shards). A folder: every file under it, by relative name; a list: each
    item. A string that names no file (a Hub dataset, "bytes") stands for itself."""
    if isinstance(source, (list, tuple)):
        return _digest([fingerprint(s, content) for s in source])
    if not isinstance(source, str) or not os.path.exists(source):
        return str(source)
    if os.path.isdir(source):
        names = sorted(os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs)
        return _digest([(n, fingerprint(os.path.join(source, n), content)) for n in names])
    st = os.stat(source)
    if not content:
        return _digest([st.st_size, st.st_mtime_ns])
    h = hashlib.sha1(str(st.st_size).encode())
    with open(source, "rb") as f:
        if st.st_size <= HASHED_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            h.update(f.read(2**20))
            f.seek(-2**20, os.SEEK_END)
            h.update(f.read(2**20) + str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def _digest(value):
    return hashlib.sha1(json.dumps(value).encode()).hexdigest()[:16]
