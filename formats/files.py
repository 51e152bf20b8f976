"""Opening files that may be hostile: only regular files, never blocking on a FIFO, every length
bounded before anything is allocated, JSON parsed strictly."""
import json
import math
import os
import stat

# Far above what any real model needs (Qwen3-32B: a 60 KB manifest, 50 KB rank headers), far
# below what could hurt: a JSON document of this size parses in well under a second.
MAX_JSON_BYTES = 64 << 20


def open_regular(path, what, error):
    """A read-only file object for `path`, which must be a regular file. The open cannot block
    (O_NONBLOCK: a FIFO would wait for a writer), and the check is made on the opened file
    itself, so a symlink swapped in meanwhile changes nothing. Raises `error` naming `what`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what}: missing") from None
    except OSError as e:
        raise error(f"{what}: cannot be opened: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise error(f"{what}: {kind}, expected a file")
    return os.fdopen(fd, "rb", buffering=0)


def read_bounded(f, max_bytes, what, error):
    """All of an opened regular file, refusing one longer than `max_bytes`."""
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise error(f"{what}: {size} bytes, more than the {max_bytes} bytes a reader accepts")
    try:
        data = f.read(max_bytes + 1)  # the file may have grown since fstat
    except OSError as e:
        raise error(f"{what}: cannot be read: {e.strerror}") from None
    if len(data) > max_bytes:
        raise error(f"{what}: more than the {max_bytes} bytes a reader accepts")
    return data


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON syntax, but no double holds it
        raise ValueError(f"{text} is beyond the range of a double")
    return value


def parse_json(data, what, error):
    """The JSON value of `data`: strict (NaN and Infinity, which Python's json accepts, are
    refused, and so are numbers beyond a double) and safe against hostile nesting."""
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{what}: not valid JSON: {e}") from None


def read_json(path, what, error, max_bytes=MAX_JSON_BYTES):
    """The JSON value of the regular file at `path`; every problem raises `error` naming `what`."""
    with open_regular(path, what, error) as f:
        data = read_bounded(f, max_bytes, what, error)
    return parse_json(data, what, error)
