"""Where the conversion goes: a staging directory beside OUTPUT, renamed into place once complete.

Nothing but a directory that qwen3pack wrote is ever replaced, and only with --force: never the
source checkpoint or a directory containing it, never a symlink, a file or a device. The decision
is taken again at the rename itself, so that an OUTPUT that appears or changes while converting
is left as it is.
"""
import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .. import _core
from ..formats.files import MAX_JSON_BYTES
from ..formats.reader import MANIFEST
from .interrupts import Interrupted, conversion_signals
from .source import SourceError, read_json
from .write import ConversionError

# renameat2 errors that mean "not here" (no such system call, or a filesystem without the flag)
UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def commit_atomically(output, force, sources, fill):
    """Runs fill(staging) on a new directory beside `output`, then puts it in place; `sources`
    (the checkpoint's folder and files) are never replaced, nor what contains them. On any error
    or interrupt the staging directory is removed and `output` is as it was; an interrupt while
    OUTPUT is being put in place is raised once it is, as Interrupted(output_complete=True)."""
    output = real_parent(output)
    replaced = check_output(output, sources, force)
    with conversion_signals() as signals:
        made = []  # the staging directory, recorded the moment it exists: a signal may come right after
        try:
            fill(_make_staging(output, signals, made))
        except BaseException:
            with signals.held():
                for staging in made:
                    shutil.rmtree(staging, ignore_errors=True)
            raise
        [staging] = made
        with signals.held() as held:
            _put_in_place(staging, output, replaced, sources)
            signals.output_complete = True
        if held.signum is not None:
            raise Interrupted(held.signum, output_complete=True)


def real_parent(output):
    """`output` with its parent resolved (so that '.', '..' and symlinked folders name the real
    place); the last component stays as given: a symlink there is refused, never followed."""
    path = Path(output)
    if path.name in ("", "..") or path.parent == path:
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def check_output(output, sources, force):
    """The stat of the qwen3pack directory at `output` that --force replaces, or None when
    nothing is there; anything else is refused. Creates `output`'s parent."""
    _make_parent(output)
    try:
        found = os.lstat(output)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConversionError(f"{output}: {error.strerror}") from None
    if stat.S_ISLNK(found.st_mode):
        raise ConversionError(f"{output}: is a symbolic link; qwen3pack never replaces one, even with --force")
    if not stat.S_ISDIR(found.st_mode):
        raise ConversionError(f"{output}: exists and is not a directory; qwen3pack never replaces it, "
                              "even with --force")
    if not force:
        raise ConversionError(f"{output}: already exists (use --force to replace it)")
    _check_replaceable(output, found, sources)
    return found


def _make_parent(output):
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConversionError(f"{output}: its parent {output.parent} is not a directory") from None
    except OSError as error:
        raise ConversionError(f"{output}: cannot create its parent {output.parent}: {error.strerror}") from None


def _check_replaceable(path, expected, sources):
    """Refuses unless `path` is still the directory `expected` (an lstat), holds a qwen3pack
    manifest, and neither is nor contains the source checkpoint."""
    try:
        found = os.lstat(path)
    except OSError:
        found = None
    if found is None or not stat.S_ISDIR(found.st_mode) or not os.path.samestat(found, expected):
        raise ConversionError(f"{path}: changed while converting; left as it is")
    # by inode, not by name: a bind mount or a hard-linked path is the same directory
    if any(os.path.samestat(found, os.stat(folder)) for folder in _folders_holding(sources)):
        raise ConversionError(f"{path}: is the source checkpoint or contains it; never replaced")
    if not _is_qwen3pack_output(path):
        raise ConversionError(f"{path}: not a qwen3pack output (its {MANIFEST} does not say "
                              '"format": "qwen3pack"); --force replaces only those')


def _folders_holding(sources):
    """Every folder that holds one of `sources` (the checkpoint's folder and its files), at any
    depth, through symlinks: a hub snapshot's files link to blobs elsewhere in the cache."""
    for source in sources:
        real = Path(os.path.realpath(source))
        yield from real.parents
        if real.is_dir():
            yield real


def _still_replaceable(path, expected, sources):
    """Whether what a rename took out of OUTPUT, now at `path`, is the directory checked before."""
    try:
        _check_replaceable(path, expected, sources)
    except ConversionError:
        return False
    return True


def _is_qwen3pack_output(directory):
    try:
        manifest = read_json(directory / MANIFEST, MAX_JSON_BYTES)
    except SourceError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == "qwen3pack"


def _make_staging(output, signals, made):
    """A new, uniquely named, hidden directory beside `output`, appended to `made` before any
    signal can be raised (the caller removes what `made` holds). A signal while it is made is
    raised once it is recorded."""
    with signals.held() as held:
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        except OSError as error:
            raise ConversionError(f"{output}: cannot write in {output.parent}: {error.strerror}") from None
        made.append(staging)
    if held.signum is not None:
        raise Interrupted(held.signum)
    return staging


def _put_in_place(staging, output, replaced, sources):
    """Renames `staging` to `output`; `replaced` is the stat of the directory that it replaces,
    None when `output` must not exist. On failure `staging` is gone and `output` is as it was."""
    if replaced is None:
        try:
            _rename_noreplace(staging, output)
        except FileExistsError:
            shutil.rmtree(staging)
            raise ConversionError(f"{output}: appeared while converting; left as it is "
                                  "(use --force to replace it)") from None
        except BaseException:
            shutil.rmtree(staging)
            raise
        return
    try:
        _rename_exchange(staging, output)
    except OSError as error:
        if error.errno not in UNSUPPORTED:
            shutil.rmtree(staging)
            raise ConversionError(f"{output}: could not be replaced: {error.strerror}; left as it is") from None
        _replace_by_renames(staging, output, replaced, sources)
        return
    # `staging` now names what was at OUTPUT: deleted only if it is still the directory checked
    if not _still_replaceable(staging, replaced, sources):
        _rename_exchange(staging, output)
        shutil.rmtree(staging)
        raise ConversionError(f"{output}: changed while converting; left as it is")
    _remove_replaced(staging, output)


def _replace_by_renames(staging, output, replaced, sources):
    """The replacement where the filesystem cannot exchange two paths: OUTPUT is renamed aside,
    checked, and renamed back if anything fails before the new directory is in its place."""
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
    try:
        os.rename(output, retired)  # onto the empty directory that reserved the name
    except OSError as error:
        os.rmdir(retired)
        shutil.rmtree(staging)
        raise ConversionError(f"{output}: could not be replaced: {error.strerror}; left as it is") from None
    try:
        if not _still_replaceable(retired, replaced, sources):
            raise ConversionError(f"{output}: changed while converting; left as it is")
        os.rename(staging, output)
    except BaseException:
        try:
            _put_back(retired, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_replaced(retired, output)


def _put_back(retired, output):
    try:
        os.rename(retired, output)
    except OSError as error:  # says where the old output is rather than leave it hidden unsaid
        raise ConversionError(f"{output}: could not be put back from {retired}, where it is now: "
                              f"{error.strerror}") from None


def _remove_replaced(path, output):
    try:
        shutil.rmtree(path)
    except OSError as error:
        raise ConversionError(f"{output}: written, but the directory it replaced could not be removed "
                              f"entirely from {path}: {error.strerror}") from None


def _rename_noreplace(source, target):
    """os.rename that fails with FileExistsError, atomically, when `target` exists."""
    try:
        _renameat2(_core.rename_noreplace, source, target)
    except OSError as error:
        if error.errno not in UNSUPPORTED:
            raise
        os.mkdir(target)  # claims the name: FileExistsError when it is taken
        try:
            os.rename(source, target)  # a directory replaces an empty one
        except BaseException:
            with contextlib.suppress(OSError):  # only while it is still the empty one claimed
                os.rmdir(target)
            raise


def _rename_exchange(a, b):
    _renameat2(_core.rename_exchange, a, b)


def _renameat2(rename, source, target):
    error = rename(str(source), str(target))
    if error:
        raise OSError(error, os.strerror(error), str(source), None, str(target))
