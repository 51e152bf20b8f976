"""Opening files that may be hostile: only regular files, never blocking on a FIFO, every length
bounded before anything is allocated, JSON parsed strictly. The converter reads its sources
through the same functions, with its own error class."""
import json
import math
import os
import stat

# Far above what any real model needs (Qwen3-32B: a 60 KB manifest, 50 KB rank headers), far
# below what could hurt: a JSON document of this size parses in well under a second.
MAX_JSON_BYTES = 64 << 20


def open_regular(path, what, error):
    """A read-only binary file object for `path`, which must be a regular file. Anything else (a
    directory, a FIFO, a device) is refused before it is opened, since opening some devices acts
    on them; the open cannot block (O_NONBLOCK, which a regular file ignores) should a FIFO take
    the file's place meanwhile, and the opened file is checked again. Raises `error` naming `what`."""
    try:
        _check_regular(what, os.stat(path).st_mode, error)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what}: missing") from None
    except OSError as e:
        raise error(f"{what}: cannot be read: {e.strerror}") from None
    file = os.fdopen(fd, "rb", buffering=0)
    try:
        _check_regular(what, os.fstat(fd).st_mode, error)
    except error:
        file.close()
        raise
    return file


def _check_regular(what, mode, error):
    if not stat.S_ISREG(mode):
        raise error(f"{what}: {_kind(mode)}, not a regular file")


def _kind(mode):
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def read_into(fd, buffer, offset):
    """Fills `buffer` from `fd` at `offset` (pread, again after a short read); returns how many
    bytes it got, fewer than the buffer holds only where the file ends."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def read_bounded(f, max_bytes, what, error):
    """All of an opened regular file, refusing one longer than `max_bytes`."""
    try:
        data = f.read(min(os.fstat(f.fileno()).st_size, max_bytes) + 1)  # +1: it may have grown
    except OSError as e:
        raise error(f"{what}: cannot be read: {e.strerror}") from None
    if len(data) > max_bytes:
        raise error(f"{what}: larger than {max_bytes} bytes, too large for this file")
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
    except RecursionError:
        raise error(f"{what}: not valid JSON: nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{what}: not valid JSON: {e}") from None


def read_json(path, what, error, max_bytes=MAX_JSON_BYTES):
    """The JSON value of the regular file at `path`; every problem raises `error` naming `what`."""
    with open_regular(path, what, error) as f:
        data = read_bounded(f, max_bytes, what, error)
    return parse_json(data, what, error)
