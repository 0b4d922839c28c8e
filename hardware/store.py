"""The device credential store: a credential directory plus a staging area beside it.

Theory of operation
-------------------
What other programs read is a *credential directory* (docs/ARCHITECTURE.md, "Files")::

    device.key      PEM private key, mode 0600
    device.crt      the leaf followed by the issuing CA (a TLS client sends the chain from one file)
    chain.crt       the issuing CA alone
    ca.crt          the root: the trust anchor used to verify the broker
    identity.json   device id, trust domain, optional broker address

Nothing is ever written there piecemeal. Uploads land in ``.staging/`` as ``<kind>.part`` (the
bytes so far) plus ``<kind>.meta`` (declared length and SHA-256, and a tag naming who made it).
The watermark of an upload is simply the length of its ``.part`` file, fsynced after every chunk,
so a device that reboots mid-upload resumes where it stopped instead of starting over.

COMMIT writes every new file as ``.<name>.tmp`` (fsync), then a journal naming them (fsync), then
renames them all into place, fsyncs the directory and deletes the journal. Each file is therefore
always whole, and the *set* is all-or-nothing: if power fails after the journal is written, opening
the store rolls the renames forward; if it fails before, the stray temporaries are deleted and the
staging area is still intact for another COMMIT.

A generated key never leaves this store: GENKEY stages ``key.part`` (0600) and ``csr.part``
together, and COMMIT moves the key into ``device.key`` alongside the certificate.

``.locked`` holds the device id once LOCK succeeded. File handling sticks to string paths and a few
``os`` calls so the module runs unchanged under MicroPython. Where MicroPython's ``os`` has no
``open``/``fsync``/``chmod`` (the unix port; boards too), files are written with the built-in
``open`` and made durable by ``flush()`` (which fsyncs there), and modes are set with ``chmod(1)``
through ``os.system`` while the file is still empty, so a key is never readable by others. A board
with no ``os.system`` has no file modes to set. A directory fsync needs ``O_DIRECTORY`` and is
skipped without it.
"""

import errno
import hashlib
import os

from hardware._compat import TYPE_CHECKING, dataclass
from hardware.codec import ObjectKind
from hardware.errors import StoreError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import BinaryIO

__all__ = [
    "FILE_NAMES",
    "JOURNAL_FILE",
    "LOCK_FILE",
    "MAX_OBJECT_SIZE",
    "STAGING_DIR",
    "CredentialStore",
    "Staged",
]

FILE_NAMES: dict[int, str] = {
    ObjectKind.KEY: "device.key",
    ObjectKind.CERT: "device.crt",
    ObjectKind.CHAIN: "chain.crt",
    ObjectKind.CA: "ca.crt",
    ObjectKind.IDENTITY: "identity.json",
}
_STAGED_NAMES: dict[int, str] = {
    ObjectKind.KEY: "key",
    ObjectKind.CSR: "csr",
    ObjectKind.CERT: "cert",
    ObjectKind.CHAIN: "chain",
    ObjectKind.CA: "ca",
    ObjectKind.IDENTITY: "identity",
}
STAGING_DIR = ".staging"
LOCK_FILE = ".locked"
JOURNAL_FILE = ".commit-journal"
# Far above any certificate chain; it bounds what a confused station can make a small device store.
MAX_OBJECT_SIZE = 64 * 1024

_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700


@dataclass(frozen=True, slots=True)
class Staged:
    """An upload in progress (or finished, awaiting COMMIT)."""

    __match_args__ = ("kind", "total", "sha256", "watermark", "tag")  # for MicroPython
    kind: int
    total: int
    sha256: bytes
    watermark: int
    tag: str

    @property
    def complete(self) -> bool:
        return self.watermark == self.total


# CPython's low-level file calls, or None under MicroPython (see the module docstring).
_os_open = getattr(os, "open", None)
_os_fsync = getattr(os, "fsync", None)
_os_chmod = getattr(os, "chmod", None)
_os_system = getattr(os, "system", None)
_os_makedirs = getattr(os, "makedirs", None)


def _fsync_fd(fd: int) -> None:
    if _os_fsync is not None:
        _os_fsync(fd)


def _fsync_dir(path: str) -> None:
    # Without this a rename can be lost on power failure even though the file data was synced.
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None or _os_open is None:
        return
    fd = _os_open(path, os.O_RDONLY | flags)
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _chmod(path: str, mode: int) -> None:
    """``os.chmod``; under MicroPython's unix port ``chmod(1)``; on a board nothing (no modes)."""
    if _os_chmod is not None:
        _os_chmod(path, mode)
        return
    if _os_system is None:
        return
    quoted = "'" + path.replace("'", "'\\''") + "'"
    if _os_system(f"chmod {mode:o} -- {quoted}") != 0:
        raise OSError(errno.EACCES, f"chmod {mode:o} {path} failed")


def _makedirs(path: str, mode: int) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``, built from ``os.mkdir`` where that is all."""
    if _exists(path):
        return
    if _os_makedirs is not None:
        _os_makedirs(path, mode=mode, exist_ok=True)
        return
    parent = path.rstrip("/").rpartition("/")[0]
    if parent:
        _makedirs(parent, 0o777)
    try:
        os.mkdir(path)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        return
    if mode != 0o777:
        _chmod(path, mode)


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def _missing(exc: OSError) -> bool:
    # MicroPython has no FileNotFoundError; the errno test works on both.
    return exc.errno == errno.ENOENT


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError as exc:
        if not _missing(exc):
            raise


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        if _missing(exc):
            return None
        raise


def _write_synced(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` from scratch, created with ``mode`` so a key is never briefly readable."""
    _remove(path)
    if _os_open is None:
        with open(path, "wb") as f:
            if mode != _PUBLIC_MODE:
                _chmod(path, mode)  # while the file is still empty
            _write_all(f, data)
            f.flush()  # MicroPython: flush() on a file fsyncs
        return
    fd = _os_open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _append_synced(path: str, data: bytes) -> None:
    """Append ``data`` to an existing file and make it durable."""
    if _os_open is None:
        with open(path, "ab") as f:
            _write_all(f, data)
            f.flush()
        return
    fd = _os_open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _write_all(f: "BinaryIO", data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]


class CredentialStore:
    """One device's credential directory, its staging area, journal and lock marker."""

    def __init__(self, root: "str | Path") -> None:
        self.root = str(root)
        self._staging = self.root + "/" + STAGING_DIR
        try:
            for path in (self.root, self._staging):
                _makedirs(path, _DIR_MODE)
            self._recover()
        except OSError as exc:
            raise StoreError(self.root, f"cannot open: {exc}") from exc

    def _path(self, name: str) -> str:
        return self.root + "/" + name

    def _staged_path(self, kind: int, suffix: str) -> str:
        return self._staging + "/" + _STAGED_NAMES[kind] + suffix

    # -- staging ---------------------------------------------------------------------------------

    def staged(self, kind: int) -> "Staged | None":
        """The upload in progress for ``kind``, or ``None``."""
        if kind not in _STAGED_NAMES:
            return None
        meta = _read(self._staged_path(kind, ".meta"))
        if meta is None:
            return None
        try:
            total_text, sha_hex, tag = meta.decode("ascii").rstrip("\n").split(" ", 2)
            total = int(total_text)
            digest = bytes.fromhex(sha_hex)
            size = os.stat(self._staged_path(kind, ".part"))[6]
        except (ValueError, OSError):
            # A damaged record is an upload that never happened; the station starts it again.
            self.discard(kind)
            return None
        return Staged(kind, total, digest, min(size, total), tag)

    def staged_kinds(self) -> list[int]:
        """Every kind with staged data, in ``ObjectKind`` order."""
        return [kind for kind in sorted(_STAGED_NAMES) if self.staged(kind) is not None]

    def begin(self, kind: int, total: int, sha256: bytes, *, tag: str = "") -> int:
        """Start an upload, or resume the identical one; returns the watermark."""
        current = self.staged(kind)
        if current is not None and (current.total, current.sha256, current.tag) == (
            total,
            sha256,
            tag,
        ):
            return current.watermark
        try:
            self.discard(kind)
            _write_synced(self._staged_path(kind, ".part"), b"", _SECRET_MODE)
            record = f"{total} {sha256.hex()} {tag}\n".encode("ascii")
            self._replace(self._staged_path(kind, ".meta"), record, _SECRET_MODE)
            _fsync_dir(self._staging)
        except OSError as exc:
            raise StoreError(self.root, f"cannot stage {_STAGED_NAMES[kind]}: {exc}") from exc
        return 0

    def write(self, kind: int, offset: int, data: bytes) -> int:
        """Write a chunk at ``offset``; bytes below the watermark are already there and skipped."""
        current = self.staged(kind)
        if current is None:
            msg = f"no upload in progress for {_STAGED_NAMES.get(kind, kind)}"
            raise ValueError(msg)
        mark = current.watermark
        if offset > mark:
            msg = f"offset {offset} is beyond the watermark {mark}"
            raise ValueError(msg)
        tail = data[mark - offset :]
        if not tail:
            return mark
        if mark + len(tail) > current.total:
            msg = f"chunk ends at {mark + len(tail)}, past the declared length {current.total}"
            raise ValueError(msg)
        try:
            _append_synced(self._staged_path(kind, ".part"), tail)
        except OSError as exc:
            raise StoreError(self.root, f"cannot write {_STAGED_NAMES[kind]}: {exc}") from exc
        return mark + len(tail)

    def stage_whole(self, kind: int, data: bytes, *, tag: str) -> None:
        """Stage a complete object in one go (GENKEY's key and CSR)."""
        self.begin(kind, len(data), hashlib.sha256(data).digest(), tag=tag)
        self.write(kind, 0, data)

    def staged_bytes(self, kind: int) -> bytes:
        data = _read(self._staged_path(kind, ".part"))
        return b"" if data is None else data

    def discard(self, kind: int) -> None:
        """Forget the upload for ``kind``; the meta goes first so a crash leaves no half record."""
        _remove(self._staged_path(kind, ".meta"))
        _remove(self._staged_path(kind, ".part"))

    # -- committed objects -----------------------------------------------------------------------

    def read(self, kind: int) -> bytes | None:
        """A stored object (``CERT`` is the leaf alone; ``CSR`` comes from staging), or ``None``."""
        if kind == ObjectKind.CSR:
            staged = self.staged(kind)
            return self.staged_bytes(kind) if staged is not None and staged.complete else None
        name = FILE_NAMES.get(kind)
        if name is None:
            return None
        data = _read(self._path(name))
        if data is None or kind != ObjectKind.CERT:
            return data
        chain = _read(self._path(FILE_NAMES[ObjectKind.CHAIN]))
        if chain and len(data) > len(chain) and data.endswith(chain):
            return data[: -len(chain)]
        return data

    def has(self, kind: int) -> bool:
        name = FILE_NAMES.get(kind)
        return name is not None and _exists(self._path(name))

    def digest(self, kind: int) -> tuple[int, bytes] | None:
        """``(length, sha256)`` of the stored object, read back from disk."""
        data = self.read(kind)
        if data is None:
            return None
        return len(data), hashlib.sha256(data).digest()

    def commit(self, kinds: "Sequence[int]") -> None:
        """Move the staged ``kinds`` into the credential directory, all or nothing.

        The caller (the responder) has already checked that each is complete and hashes right.
        """
        new = {kind: self.staged_bytes(kind) for kind in kinds if kind in FILE_NAMES}
        if not new:
            return
        files: list[tuple[str, bytes, int]] = []
        for kind in (ObjectKind.KEY, ObjectKind.CHAIN, ObjectKind.CA, ObjectKind.IDENTITY):
            if kind in new:
                mode = _SECRET_MODE if kind == ObjectKind.KEY else _PUBLIC_MODE
                files.append((FILE_NAMES[kind], new[kind], mode))
        if ObjectKind.CERT in new or ObjectKind.CHAIN in new:
            leaf = new.get(ObjectKind.CERT, self.read(ObjectKind.CERT))
            if leaf is not None:
                chain = new.get(ObjectKind.CHAIN, _read(self._path(FILE_NAMES[ObjectKind.CHAIN])))
                files.append((FILE_NAMES[ObjectKind.CERT], leaf + (chain or b""), _PUBLIC_MODE))
        try:
            for name, data, mode in files:
                _write_synced(self._path("." + name + ".tmp"), data, mode)
            lines = ["kinds " + " ".join(str(int(k)) for k in sorted(new))]
            lines.extend("file " + name for name, _, _ in files)
            self._replace(self._path(JOURNAL_FILE), ("\n".join(lines) + "\n").encode(), 0o600)
            _fsync_dir(self.root)
        except OSError as exc:
            self._drop_temporaries()
            raise StoreError(self.root, f"commit failed, nothing changed: {exc}") from exc
        try:
            self._roll_forward()
        except OSError as exc:
            reason = f"commit interrupted, it will finish when the store is reopened: {exc}"
            raise StoreError(self.root, reason) from exc

    # -- lock and reset --------------------------------------------------------------------------

    def locked_id(self) -> str | None:
        data = _read(self._path(LOCK_FILE))
        return None if data is None else data.decode("ascii", "replace").strip()

    def lock(self, device_id: str) -> None:
        try:
            self._replace(self._path(LOCK_FILE), device_id.encode("ascii") + b"\n", _PUBLIC_MODE)
            _fsync_dir(self.root)
        except OSError as exc:
            raise StoreError(self.root, f"cannot write the lock marker: {exc}") from exc

    def wipe(self) -> None:
        """Delete credentials, staging and journal, and finally the lock marker."""
        try:
            for kind in _STAGED_NAMES:
                self.discard(kind)
            for name in FILE_NAMES.values():
                _remove(self._path(name))
            _remove(self._path(JOURNAL_FILE))
            self._drop_temporaries()
            _fsync_dir(self.root)
            # Last, so a reset cut short leaves a unit that is still locked, not one open to writes
            # with half its credentials.
            _remove(self._path(LOCK_FILE))
            _fsync_dir(self.root)
        except OSError as exc:
            raise StoreError(self.root, f"factory reset failed: {exc}") from exc

    # -- internals -------------------------------------------------------------------------------

    def _replace(self, path: str, data: bytes, mode: int) -> None:
        tmp = path + ".tmp"
        _write_synced(tmp, data, mode)
        os.rename(tmp, path)

    def _drop_temporaries(self) -> None:
        for name in os.listdir(self.root):
            if name.startswith(".") and name.endswith(".tmp"):
                _remove(self._path(name))

    def _roll_forward(self) -> None:
        journal = _read(self._path(JOURNAL_FILE))
        if journal is None:
            return
        kinds: list[int] = []
        for line in journal.decode("ascii", "replace").splitlines():
            word, _, rest = line.partition(" ")
            if word == "kinds":
                kinds = [int(k) for k in rest.split()]
            elif word == "file":
                tmp = self._path("." + rest + ".tmp")
                if _exists(tmp):
                    os.rename(tmp, self._path(rest))
        _fsync_dir(self.root)
        for kind in kinds:
            self.discard(kind)
        if ObjectKind.KEY in kinds:
            # The CSR belonged to the key now committed; a later GENKEY makes a fresh pair.
            self.discard(ObjectKind.CSR)
        _fsync_dir(self._staging)
        _remove(self._path(JOURNAL_FILE))
        _fsync_dir(self.root)

    def _recover(self) -> None:
        # A journal means the temporaries were all complete: finish the job. Temporaries without
        # a journal are a commit that died before its point of no return: forget them.
        if _exists(self._path(JOURNAL_FILE)):
            self._roll_forward()
        self._drop_temporaries()
        for name in os.listdir(self._staging):
            if name.endswith(".tmp"):
                _remove(self._staging + "/" + name)
