"""Files and folders that appear whole, with the mode a plain open() or mkdir would give them.

Everything the pack writes is made under a temporary name next to its target and renamed into
place, so a failure never leaves half a file. mkstemp and mkdtemp create that temporary name
private to its owner (0600, 0700), and a rename keeps the mode; so before the rename the result
gets 0666 or 0777 minus the user's umask, and another user or a web server serving an outputs
folder can read a picture just made, as with any other program.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from contextlib import contextmanager

FILE_MODE = 0o666   # what open() asks for; the umask takes its bits away
FOLDER_MODE = 0o777  # what mkdir asks for
PREFIX = ".nextstep-"  # hidden, and never named like weights: a leftover of a killed write is never loaded
SUFFIX = ".part"

_lock = threading.Lock()
_umask_cache: list = []


def current_umask() -> int:
    """The process's umask. Read from /proc where Linux reports it (no change to process state,
    so no race with threads creating files); elsewhere the one os.umask round trip is made once
    and remembered, since setting the umask is the only way to read it there."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:
        if not _umask_cache:
            mask = os.umask(0o022)
            os.umask(mask)
            _umask_cache.append(mask)
        return _umask_cache[0]


def usual_mode(path: str) -> None:
    """Give a file or folder the mode open() or mkdir would have given it."""
    mode = FOLDER_MODE if os.path.isdir(path) else FILE_MODE
    os.chmod(path, mode & ~current_umask())


def _folder_of(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return folder


@contextmanager
def atomic_file(path: str):
    """Yields a temporary path in `path`'s folder to write to; on success the file gets the usual
    mode and replaces `path`, on failure it is removed."""
    fd, tmp = tempfile.mkstemp(prefix=PREFIX, suffix=SUFFIX, dir=_folder_of(path))
    os.close(fd)
    try:
        yield tmp
        usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_folder(path: str, replace: bool = False):
    """Yields a temporary folder beside `path` to fill; on success it and everything in it get the
    usual modes (writers may make private files too: safetensors 0.8's save_file leaves 0600) and
    it takes `path`'s name (a folder already there is removed first when `replace`); on failure it
    is removed."""
    tmp = tempfile.mkdtemp(prefix=PREFIX, suffix=SUFFIX, dir=_folder_of(path))
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in dirs + files:
                usual_mode(os.path.join(root, name))
        usual_mode(tmp)
        if replace and os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
