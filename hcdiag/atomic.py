"""Output files written whole or not at all, and one writer per output.

Every file hcdiag writes (run files, report files) goes to a temporary ``.NAME.XXXXXXXX.tmp`` in the
target's folder (``tempfile.mkstemp``: XXXXXXXX are its 8 random characters), is flushed and fsynced,
then renamed over ``NAME``: a crash leaves the old file or the new one, never half of one. While it
writes, the writer holds an ``fcntl.flock`` on its temporary, so a temporary whose lock can be taken
was left by a writer that died (kill -9, power loss) and is removed before the next write of ``NAME``.
Nothing else is ever removed: only names of exactly that pattern, only when no live process holds them.

:class:`OutputLock` lets one process at a time write an output (``hcdiag train --out``): an ``flock`` on
``.NAME.lock`` beside it, which the kernel releases when the holder dies, so a stale lock never blocks.
Where the file system has no locks (some network mounts) both work without them.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX): no locks, no stale-temporary detection
    fcntl = None

# tempfile.mkstemp's random part: 8 characters of [a-z0-9_]
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_LOCK_TEXT = re.compile(r"^hcdiag [\w-]+ pid \d+\n?$")


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True when taken, False when another holds it, None when
    this file system has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP...: no locks here
        return None


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike):
    """Hold an exclusive lock on the file ``path`` (a ``.lock`` beside a cache entry: the EM cache's, the
    reference cache's) while the block runs, so that one process computes an entry while the others wait and
    then read it. Where the file system has no locks, or the lock file cannot be made, the block runs unlocked:
    each process computes on its own and the last atomic write wins (the same result, more work)."""
    lock = None
    try:
        import fcntl

        lock = open(path, "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this file system
    except (ImportError, OSError):
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def temporary(folder: str | os.PathLike, name: str) -> tuple[int, Path]:
    """A new locked temporary for ``folder/name``: ``(fd, path)``. The caller writes ``fd``, renames the
    path over the target and closes ``fd`` (which releases the lock), or unlinks the path on failure.
    Stale temporaries of ``name`` are removed first. Raises ``OSError`` when the folder refuses it."""
    remove_stale(folder, lambda target: target == name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    _try_lock(fd)  # a fresh file: nobody else can hold it
    return fd, Path(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` written to ``path`` whole or not at all: a locked temporary beside it (:func:`temporary`), flushed
    and fsynced, renamed over it; removed on any failure (the old file stays). Raises ``OSError``."""
    p = Path(path)
    fd, tmp = temporary(p.parent, p.name)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode(p))
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # releases the temporary's lock only after its rename or removal


def file_mode(target: str | os.PathLike) -> int:
    """The permission bits a new version of ``target`` gets: the old file's, else the usual ones
    (0666 less the umask). ``mkstemp`` makes its temporaries 0600."""
    try:
        return os.stat(target).st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def remove_stale(folder: str | os.PathLike, wanted) -> list[Path]:
    """Remove the temporaries ``.NAME.XXXXXXXX.tmp`` in ``folder`` whose ``wanted(NAME)`` is true and
    whose writer is dead (its lock can be taken); returns the removed paths. Never raises: a temporary
    that cannot be read or removed is left alone, as is everything where locks do not work."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or not wanted(m.group("name")):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd) and os.path.samestat(os.fstat(fd), os.stat(entry.path, follow_symlinks=False)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class OutputBusy(Exception):
    """Another live process holds the output's lock; ``pid`` is its process id when it wrote one."""

    def __init__(self, lock_path: Path, pid: int | None):
        super().__init__(f"{lock_path} is held by pid {pid}")
        self.lock_path, self.pid = lock_path, pid


class OutputLock:
    """An exclusive, non-blocking lock on writing ``target``: ``.NAME.lock`` beside it, holding
    ``hcdiag <owner> pid <pid>``. :meth:`acquire` raises :class:`OutputBusy` when a live process holds it;
    :meth:`release` removes the lock file (still locked, so a waiting process sees the removal and
    retries on a fresh file). A lock file left by a killed process is taken over."""

    def __init__(self, target: str | os.PathLike, owner: str = "train"):
        target = Path(target)
        self.path = target.parent / f".{target.name}.lock"
        self.owner = owner
        self._fd: int | None = None
        self._ours = False

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # removed by its holder in between: try again
                    continue
            got = _try_lock(fd)
            if got is False:
                pid = _read_pid(fd)
                os.close(fd)
                raise OutputBusy(self.path, pid)
            if got is None:  # no locks on this file system: go on without one
                os.close(fd)
                if created:
                    os.unlink(self.path)
                return self
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it after we opened it: lock the new one
                os.close(fd)
                continue
            text = os.pread(fd, 200, 0).decode("utf-8", "replace")
            # a file of that name that hcdiag did not write is locked but neither rewritten nor removed
            self._ours = created or not text or bool(_LOCK_TEXT.match(text))
            if self._ours:
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"hcdiag {self.owner} pid {os.getpid()}\n".encode(), 0)
                except OSError:  # a full disk: the lock holds without the pid
                    pass
            self._fd = fd
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._ours:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        m = re.search(rb"pid (\d+)", os.pread(fd, 200, 0))
    except OSError:
        return None
    return int(m.group(1)) if m else None
