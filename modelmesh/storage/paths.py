"""Client-given paths meeting the filesystem: refused as domain errors, confined to a root.

A model path comes from a client (``registerModel``, the runtime SPI's
``loadModel``) and reaches ``os`` functions, which answer odd input with
``ValueError`` (a NUL byte), ``UnicodeEncodeError`` (a lone surrogate) or
``OSError`` (a component too long, permission denied). Here those become
errors a user can act on, and every file a runtime opens is held to a
``FileScope``:

- the path is resolved (symlinks followed) and must lie under the scope's
  root, itself resolved: a link inside the models root that points elsewhere
  is refused (``StorageError``, FAILED_PRECONDITION);
- only regular files are opened: a FIFO would block the loading thread and a
  device such as ``/dev/zero`` would never end;
- a file larger than the scope's ``max_file_bytes`` is refused
  (``CapacityExceeded``) before it is read into memory;
- the resolved path is opened, not the client's, without following a final
  symlink and without blocking; where ``/proc`` shows it, the opened file's
  own path is checked again, so a directory swapped for a symlink between the
  check and the open is caught too.

``check_path_text`` is the text rule (``InvalidArgument``): no NUL byte,
encodable, no component over ``NAME_MAX`` bytes, at most ``PATH_MAX`` bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from modelmesh.errors import CapacityExceeded, InvalidArgument, MeshError, StorageError

#: Longest file name component and path (bytes) most Linux filesystems take.
NAME_MAX = 255
PATH_MAX = 4096
#: Most entries a model directory may hold (its tree is checked before each load).
MAX_TREE_ENTRIES = 100_000


#: Resolving a path through the kernel (open it as a bare reference, read back the
#: name ``/proc`` gives the descriptor) takes 3 system calls; ``os.path.realpath``
#: does one ``lstat`` per component in Python, about ten times the CPU.
_O_PATH = getattr(os, "O_PATH", 0)
_PROC_FD = _O_PATH != 0 and os.path.isdir("/proc/self/fd")


def real_path(text: str) -> str:
    """``os.path.realpath(text, strict=True)``: every symlink resolved, ``OSError`` when
    a component does not exist (or loops, or is no directory)."""
    if not _PROC_FD or not text:
        return os.path.realpath(text, strict=True)
    fd = os.open(text, _O_PATH | os.O_CLOEXEC)  # follows links; opens nothing for reading
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def check_path_text(path: str, what: str = "model path") -> None:
    """Refuse a path the filesystem cannot take, with ``InvalidArgument`` saying why."""
    if "\x00" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {path!r} is not valid text (a lone surrogate)") from None
    if len(raw) > PATH_MAX:
        raise InvalidArgument(f"{what} is {len(raw)} bytes long; at most {PATH_MAX} are allowed")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            raise InvalidArgument(
                f"{what} {_short(path)!r} has a component of {len(part)} bytes; "
                f"file names are at most {NAME_MAX} bytes")


def os_error(exc: OSError, shown: str) -> MeshError:
    """The domain error for an ``OSError`` met reading ``shown`` (a path as the user knows it)."""
    code = exc.errno
    if code == errno.ENAMETOOLONG:
        return InvalidArgument(f"{shown}: a file name or the path is too long")
    if code in (errno.ENOENT, errno.ENOTDIR):
        return StorageError(f"{shown} does not exist")
    if code in (errno.EACCES, errno.EPERM):
        return StorageError(f"{shown}: permission denied (the mesh cannot read it)")
    if code == errno.ELOOP:
        return StorageError(f"{shown}: too many levels of symbolic links")
    return StorageError(f"{shown}: {exc.strerror or exc}")


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class FileScope:
    """Where a model's files may be: under ``root`` (resolved), each at most ``max_file_bytes``.

    ``label`` names the root in messages ("the models root", "the model's directory").
    ``allow_symlinks`` False: any symlink is refused, even one that stays inside (the
    disk cache, where the mesh writes every file itself and none can be a link).
    """

    root: str
    max_file_bytes: int = 0  # 0: no limit
    label: str = "the models root"
    allow_symlinks: bool = True

    @classmethod
    def at(cls, root: Path | str, max_file_bytes: int = 0, label: str = "the models root",
           allow_symlinks: bool = True) -> FileScope:
        return cls(os.path.realpath(root), max(0, max_file_bytes), label, allow_symlinks)

    @classmethod
    def of_model(cls, path: Path) -> FileScope:
        """The scope of a model given as a bare path: its directory, or the file's directory."""
        base = path if os.path.isdir(path) else path.parent
        return cls.at(base, label="the model's directory")

    # -- resolving ------------------------------------------------------------------

    def shown(self, path: Path | str) -> str:
        """``path`` as a message shows it: relative to the root where it is inside."""
        text = os.fspath(path)
        if _inside(text, self.root) and text != self.root:
            return text[len(self.root.rstrip(os.sep)) + 1:]
        return text

    def resolve(self, path: Path | str) -> Path:
        """``path`` with every symlink resolved; refused unless it exists under the root."""
        text = os.fspath(path)
        shown = self.shown(text)
        check_path_text(text, f"path '{_short(shown)}'")
        try:
            real = real_path(text)
        except OSError as exc:
            raise os_error(exc, f"'{shown}'") from None
        if not _inside(real, self.root):
            raise StorageError(f"'{shown}' resolves outside {self.label}; refusing to read it")
        return Path(real)

    def regular_file(self, path: Path | str, *, resolved: bool = False) -> Path:
        """The resolved path of a regular file under the root (not a FIFO, device, directory).

        ``resolved``: ``path`` is what ``resolve`` just returned (not resolved again)."""
        real = Path(path) if resolved else self.resolve(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise os_error(exc, f"'{self.shown(path)}'") from None
        self._check_stat(st, path)
        return real

    def _check_stat(self, st: os.stat_result, path: Path | str) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise StorageError(f"'{self.shown(path)}' is a directory; a model file was expected")
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"'{self.shown(path)}' is {_kind(st.st_mode)}, not a regular "
                               "file; refusing to read it")
        if self.max_file_bytes and st.st_size > self.max_file_bytes:
            raise CapacityExceeded(
                f"'{self.shown(path)}' is {st.st_size} bytes, more than the "
                f"{self.max_file_bytes} bytes of model memory here")

    # -- opening --------------------------------------------------------------------

    def open(self, path: Path | str, *, resolved: bool = False) -> BinaryIO:
        """Open a regular file under the root for reading (see the module docstring).

        ``resolved``: ``path`` is what ``resolve`` (or ``model_file``) just returned; it
        is not resolved again (the opened file's own path is still checked)."""
        real = self.regular_file(path, resolved=resolved)
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | \
            getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            raise os_error(exc, f"'{self.shown(path)}'") from None
        try:
            self._check_stat(os.fstat(fd), path)
            self._check_opened(fd, path)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def _check_opened(self, fd: int, path: Path | str) -> None:
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return  # no /proc (not Linux): the checks before the open stand alone
        if not _inside(opened, self.root):
            raise StorageError(f"'{self.shown(path)}' moved outside {self.label} while being "
                               "opened; refusing to read it")

    def read_bytes(self, path: Path | str, *, resolved: bool = False) -> bytes:
        with self.open(path, resolved=resolved) as f:
            return f.read()

    def read_head(self, path: Path | str, n: int = 64, *, resolved: bool = False) -> bytes:
        with self.open(path, resolved=resolved) as f:
            return f.read(n)

    # -- trees ----------------------------------------------------------------------

    def check_tree(self, path: Path | str, *, resolved: bool = False) -> Path:
        """Check a model's files before a runtime sees them; returns ``path`` resolved.

        A file must be regular; in a directory, at any depth, every entry must be a
        directory, a regular file, or a symlink whose target (resolved) is one of
        those under the root. A directory's files may be handed on whole (to an
        external server's repository), so none may lead outside. ``resolved``: as for
        ``regular_file``.
        """
        real = Path(path) if resolved else self.resolve(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise os_error(exc, f"'{self.shown(path)}'") from None
        if not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
            raise StorageError(f"'{self.shown(path)}' is {_kind(st.st_mode)}, not a model "
                               "file or directory; refusing to read it")
        # Without symlinks allowed, the whole (small) root is walked: no link anywhere.
        tree = real if self.allow_symlinks else Path(self.root)
        if stat.S_ISDIR(st.st_mode) or tree != real:
            for _file in self.walk(tree):
                pass
        return real

    def walk(self, directory: Path) -> Iterator[Path]:
        """The regular files under ``directory`` (resolved), checked as ``check_tree`` says.

        Directories are not entered through symlinks (as ``Path.rglob`` does not).
        """
        seen = 0
        pending = [os.fspath(directory)]
        while pending:
            current = pending.pop()
            try:
                with os.scandir(current) as entries:
                    listed = sorted(entries, key=lambda e: e.name)
            except OSError as exc:
                raise os_error(exc, f"'{self.shown(current)}'") from None
            for entry in listed:
                seen += 1
                if seen > MAX_TREE_ENTRIES:
                    raise StorageError(f"'{self.shown(directory)}' holds more than "
                                       f"{MAX_TREE_ENTRIES} entries; is it a model directory?")
                try:
                    if entry.is_symlink():
                        if not self.allow_symlinks:
                            raise StorageError(f"'{self.shown(entry.path)}' is a symbolic "
                                               f"link, which {self.label} may not hold")
                        target = self.resolve(entry.path)
                        mode = os.stat(target).st_mode
                        if stat.S_ISREG(mode):
                            yield target
                        elif not stat.S_ISDIR(mode):
                            raise StorageError(f"'{self.shown(entry.path)}' links to "
                                               f"{_kind(mode)}, not a regular file")
                    elif entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield Path(entry.path)
                    else:
                        mode = entry.stat(follow_symlinks=False).st_mode
                        raise StorageError(f"'{self.shown(entry.path)}' is {_kind(mode)}, "
                                           "which a model directory may not hold")
                except OSError as exc:
                    raise os_error(exc, f"'{self.shown(entry.path)}'") from None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"
