"""Atomic artifact folders: write a sibling temporary folder, fsync it, swap it in; recover and clean up
after a save that was killed.

A save over an existing artifact swaps the two folders in one step where the system can
(Linux ``renameat2(RENAME_EXCHANGE)``), so ``path`` holds the complete old or the complete new artifact at
every instant. Elsewhere the old folder is renamed away to ``.NAME.old-<tag>`` and the new one renamed in;
a process killed between the two leaves no folder at ``path``, and :func:`recover` (run by the next save
and by loading) renames the old one back. Temporary folders are tagged with the writer's process id, so
leftovers of killed saves (``.NAME.tmp-<tag>``, ``.NAME.old-<tag>``) are removed by the next save while a
concurrent live save's folders are left alone; a folder is only removed when it holds nothing but
artifact files.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_mtl.artifact._layout import ARTIFACT_FILES, CONFIG_NAME, WEIGHTS_NAME, ArtifactError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
_LEGACY_AGE_S = 3600.0
"""Leftovers of earlier versions carry no process id: removed once this old (seconds)."""


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # musl or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_RENAMEAT2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; ``False`` where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# --- names of temporary folders -------------------------------------------------------------------------
def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _siblings(target: Path, kind: str) -> Iterator[tuple[Path, int | None]]:
    """The ``kind`` ("tmp" or "old") folders of saves to ``target``, with the writer's pid (``None``: a
    folder of an earlier version, tagged without one)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{kind}-(?:(\d+)-[0-9a-f]{{8}}|[0-9a-f]{{12}})$")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in sorted(names):
        match = pattern.match(name)
        if match:
            yield target.parent / name, int(match[1]) if match[1] else None


def _writer_gone(path: Path, pid: int | None) -> bool:
    """Whether the save that made ``path`` is over: its process is gone (or, untagged, the folder is old)."""
    if pid is None:
        try:
            return time.time() - path.lstat().st_mtime > _LEGACY_AGE_S
        except OSError:
            return False
    if pid == os.getpid():
        return False  # another save of this process may be under way
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _only_artifact_files(folder: Path) -> bool:
    """A real folder holding nothing but artifact files: the only kind this module ever deletes."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        return all(p.name in ARTIFACT_FILES and p.is_file() and not p.is_symlink() for p in folder.iterdir())
    except OSError:
        return False


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


# --- recovery and clean-up ------------------------------------------------------------------------------
def recover(target: Path) -> bool:
    """If ``target`` is missing because a save was killed between renaming the old artifact away and the
    new one in, rename the old one back; ``True`` if it did. A live save gets a moment to finish first.

    Example:
        >>> import tempfile
        >>> recover(Path(tempfile.mkdtemp()) / "model")
        False
    """
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return False
    deadline = time.monotonic() + 2.0
    while True:
        olds = [(p, pid) for p, pid in _siblings(target, "old") if _complete(p) and _only_artifact_files(p)]
        if not olds:
            return False
        gone = [p for p, pid in olds if _writer_gone(p, pid)]
        if not gone:  # a live save sits between its two renames: wait for it
            if time.monotonic() > deadline or target.exists():
                return False
            time.sleep(0.01)
            continue
        newest = max(gone, key=lambda p: (p / CONFIG_NAME).stat().st_mtime)
        try:
            os.rename(newest, target)
        except OSError:  # someone else recovered it, or saved meanwhile
            return False
        _fsync_dir(target.parent)
        return True


def remove_leftovers(target: Path) -> list[Path]:
    """Delete the temporary folders of killed saves to ``target``; return them. Folders of a live save,
    and folders holding anything but artifact files, are left alone."""
    removed = []
    for kind in ("tmp", "old"):
        for path, pid in _siblings(target, kind):
            if _writer_gone(path, pid) and _only_artifact_files(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# --- the atomic folder ------------------------------------------------------------------------------------
@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success fsync it and swap it in at ``target``."""
    recover(target)
    if target.exists() and not target.is_dir():
        raise ArtifactError(target, "exists and is not a directory; refusing to replace it.")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise ArtifactError(
            target,
            f"exists, is not empty and holds no {CONFIG_NAME}; refusing to replace a folder that is not a "
            "release artifact. Choose another directory or empty it.",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        _swap_in(tmp, target)
    finally:
        if tmp.exists():  # the new folder after a failure, or the old artifact after an exchange
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` at ``target``; after an exchange ``tmp`` holds the old artifact."""
    if not target.exists():
        os.rename(tmp, target)
    elif not exchange(tmp, target):
        old = _sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    _fsync_dir(target.parent)


# --- files ----------------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
