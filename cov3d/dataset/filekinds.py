"""What a path named like a data file really is, found without opening it.

Opening a FIFO (``mkfifo scan/1.jpg``) blocks until something writes to it, i.e. forever, and a
device or socket is no image either; a symbolic link that points (through others) back to itself
raises ELOOP wherever it is touched. Readers ask ``special_file`` first and skip or refuse such a
path with its reason, so that one odd entry never hangs or stops a whole run.
"""

from __future__ import annotations

import errno
import os
import stat

LINK_LOOP = "a symbolic link loop"
FOLDER = "a folder"
KINDS = (
    (stat.S_ISDIR, FOLDER),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def special_file(path: str | os.PathLike) -> str | None:
    """``None`` for a regular file (links followed), or for a path that cannot be looked at (missing,
    no permission: the reader reports those as before); otherwise what the path is, in words:
    ``LINK_LOOP``, ``FOLDER``, ``"a FIFO (named pipe)"``, a socket or a device."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return LINK_LOOP if error.errno == errno.ELOOP else None
    if stat.S_ISREG(mode):
        return None
    return next((words for test, words in KINDS if test(mode)), "not a regular file")


def entry_is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()`` (links followed), ``False`` for a link loop or any entry that cannot be looked at."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def entry_is_file(entry: os.DirEntry) -> bool:
    """``entry.is_file()`` (links followed), ``False`` for a link loop or any entry that cannot be looked at."""
    try:
        return entry.is_file()
    except OSError:
        return False
