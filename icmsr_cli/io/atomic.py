"""The one way icmsr writes a file or a folder: atomically and durably.

Content goes to a hidden temporary beside the target, is flushed to the disk (fsync), and only
then renamed over the target, whose folder is flushed too where the platform allows. A reader
sees the old target or the whole new one; a crash, a kill or a full disk leaves no partial target,
and the temporary is removed on any failure. Used for images, caches and downloads alike.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import DiskFullError

_UMASK = os.umask(0)
os.umask(_UMASK)
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
TEMP_SUFFIX = ".icmsr-tmp"


_STALE_AFTER = 24 * 3600  # a temporary of another machine (shared filesystem) is only presumed dead this late


#: bytes of a file name on the common file systems (ext4, XFS, Btrfs, APFS): NAME_MAX
_NAME_MAX = 255
#: what a temporary leaves of that for the target's name: it adds dots, a host name (at most 64
#: bytes), a pid, mkstemp's 8 letters, the suffix
_NAME_ROOM = _NAME_MAX - (2 + 64 + 1 + 10 + 1 + 8 + len(TEMP_SUFFIX))


def temp_prefix(path: Path) -> str:
    """Prefix of the hidden temporaries written beside `path` (so stale ones can be found): its name,
    cut short where a long one would make the temporary's name too long for the file system (a
    photo with a 240-character name failed "File name too long" after the model had run)."""
    name = path.name
    while len(os.fsencode(name)) > _NAME_ROOM:
        name = name[:-1]
    return f".{name}."


def _owner() -> str:
    """Who writes a temporary: host and process, so a rerun removes what a killed run left while
    processes still writing (other ranks, other jobs on a shared filesystem) keep theirs."""
    return f"{_host()}~{os.getpid()}~"


def _host() -> str:
    return socket.gethostname().replace("~", "-")[:64]


def _abandoned(stale: Path, prefix: str) -> bool:
    parts = stale.name[len(prefix):].split("~")  # host, pid, mkstemp's random part
    if len(parts) == 3 and parts[0] == _host() and parts[1].isdigit():
        return not _alive(int(parts[1]))
    try:
        return time.time() - stale.stat().st_mtime > _STALE_AFTER
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_no_space(exc: BaseException | None) -> bool:
    """A full disk: the OSError itself, or an error raised while handling one (torch's zip writer,
    closing an archive the disk filled mid-record, raises a RuntimeError about its position)."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def no_space_error(path: Path, needed: int | None = None) -> DiskFullError:
    """One line: where the disk is full, how much was needed and how much is free."""
    try:
        free = shutil.disk_usage(_existing_parent(path)).free
        have = f", {_mb(free)} free"
    except OSError:
        have = ""
    need = f" (needs about {_mb(needed)}{have})" if needed else (f" ({have[2:]})" if have else "")
    return DiskFullError(f"{path}: no space left on the device{need}")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} KB"


def name_too_long(path: Path) -> str | None:
    """Why `path` cannot be created for its name's length, or None: a name derived from a long
    one (logo.gif.png from a 252-byte logo.gif) failed "File name too long" after the model ran."""
    limit = _NAME_MAX  # where the folder cannot say its own
    try:
        limit = os.pathconf(_existing_parent(path), "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the folder will not say
        pass
    for part in Path(path).parts:
        if (size := len(os.fsencode(part))) > limit:
            return f"the name {part[:24]}...{part[-12:]} is {size} bytes, over the {limit} its file system allows"
    return None


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _fsync_path(path: Path) -> None:
    # Windows flushes only handles open for writing; folders open read-only (POSIX)
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. Windows cannot open a folder for fsync: nothing to do there."""
    if os.name != "nt":
        try:
            _fsync_path(folder)
        except OSError:
            pass  # some filesystems (network, FUSE) refuse fsync on folders; the file itself is synced


def remove_stale(path: Path) -> None:
    """Temporaries of `path` left by a killed run (a kill -9 cannot clean up after itself); those of
    live processes are theirs to finish."""
    prefix = temp_prefix(Path(path))
    for stale in Path(path).parent.glob(prefix + "*" + TEMP_SUFFIX):
        if not _abandoned(stale, prefix):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def replacing(path: str | Path, *, folder: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (a file, or with `folder` a directory to fill);
    on a clean exit it is synced and renamed over `path`, on any exception it is removed.

    A full disk becomes a DiskFullError naming `path` and `needed` bytes; other OSErrors propagate.
    """
    path = Path(path)
    remove_stale(path)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path) + _owner(), suffix=TEMP_SUFFIX, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path) + _owner(), suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        if folder:
            for child in tmp.iterdir():
                _fsync_path(child)
            shutil.rmtree(path, ignore_errors=True)  # a folder cannot be renamed over a full one
        sync_and_rename(tmp, path)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space_error(path, needed) from exc
        raise


def sync_and_rename(tmp: Path, path: Path) -> None:
    """Finish a temporary (from `replacing`, or a resumable download): sync it, rename it into
    place, sync the folder that holds the new name."""
    if Path(tmp).is_dir():
        _fsync_folder(Path(tmp))
    else:
        _fsync_path(Path(tmp))
    os.replace(tmp, path)
    _fsync_folder(Path(path).parent)


def write_bytes(data: bytes, path: str | Path) -> None:
    """`data` into `path`, atomically and durably."""
    with replacing(path, needed=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
