"""Files written whole or not at all, and the one error type of reading a saved file back.

``write_file`` writes through a temporary file in the same folder and renames it over the target, so a
failed write leaves an existing file as it was; ``check_writable`` checks beforehand, changing nothing, that
it can. ``StateFileError`` is what ``mono_quant.io``'s loaders (and the CLI) raise for a file they cannot
load.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

__all__ = ["StateFileError", "check_writable", "write_file"]


class StateFileError(ValueError):
    """A file that ``load_state`` or ``load_qparams`` cannot load: not such a file, another format or
    version, or contents that break what every saved state keeps (a NaN range, counts that disagree with
    ``seen``, a grid outside the float32 rules, settings that disagree with the saved class).

    The message names the file, where (kind, layer, key) and what is wrong; the same parts are attributes
    (``None`` where they do not apply).
    """

    def __init__(
        self,
        path: str,
        what: str,
        *,
        kind: str | None = None,
        layer: str | None = None,
        key: str | None = None,
    ):
        self.path, self.kind, self.layer, self.key = str(path), kind, layer, key
        where = [
            f"kind {kind!r}" if kind is not None else "",
            f"layer {layer!r}" if layer is not None else "",
        ]
        where.append(f"{key}" if key is not None else "")
        prefix = ", ".join(w for w in where if w)
        super().__init__(f"{path}: {prefix + ': ' if prefix else ''}{what}")


# --- writing files ---------------------------------------------------------------------------------------


def _temp_file(folder: str) -> tuple[int, str]:
    """A new file in ``folder`` (mode 0o666 less the umask, as ``open`` gives): ``(fd, path)``."""
    for _ in range(16):
        path = os.path.join(folder, f".mono-quant-{secrets.token_hex(6)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "cannot find a free temporary file name", folder)


def _is_special(path: str) -> bool:
    """Whether ``path`` exists and is not a regular file (a device such as /dev/null, a pipe, a socket)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_writable(path: str) -> None:
    """Check, without changing anything, that ``write_file(path, ...)`` can write there.

    A regular file (or a new one): its folder exists and takes a new file (one is created and removed),
    the name is allowed there (a new file of that name is created and removed), and an existing file is
    writable (opened for appending, never truncated). A device or pipe is only checked for write access:
    opening a pipe could end its reader, and whether ``/dev/full`` takes the data shows only when writing.

    Raises:
        OSError: what stands in the way (``strerror`` says what; ``IsADirectoryError`` for a folder).
    """
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", path)
    if _is_special(real):
        if not os.access(real, os.W_OK):
            raise PermissionError(errno.EACCES, f"cannot write to it ({os.strerror(errno.EACCES)})", path)
        return
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"the folder {folder} does not exist", path)
    exists = os.path.exists(real)
    try:
        fd, temp = _temp_file(folder)  # where write_file writes first
        os.close(fd)
        os.unlink(temp)
        if not exists:  # the name itself (too long, refused by the file system)
            os.close(os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            os.unlink(real)
    except OSError as e:
        raise type(e)(e.errno, f"cannot create a file there ({e.strerror})", path) from None
    if exists:
        try:
            os.close(os.open(real, os.O_WRONLY | os.O_APPEND))  # never truncates
        except OSError as e:
            raise type(e)(e.errno, f"cannot write to it ({e.strerror})", path) from None


def write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a failed write never leaves a destroyed or half-written file.

    A regular file (or a new one) is written to a temporary file in the same folder, flushed to disk and
    renamed over ``path`` (through symlinks: the link's target is replaced, keeping its permissions). A
    device or pipe (``/dev/stdout``) is written in place.

    Raises:
        OSError: the write failed; an existing regular file is then unchanged.
    """
    real = os.path.realpath(path)
    if _is_special(real):
        with open(real, "ab") as f:
            f.write(data)
        return
    fd, temp = _temp_file(os.path.dirname(real))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(real):
            os.chmod(temp, stat.S_IMODE(os.stat(real).st_mode))
        os.replace(temp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
