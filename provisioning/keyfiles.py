"""The one module that writes key and credential files.

Every write is atomic (temporary file in the same directory, fsync, rename, fsync of the directory),
so a crash, a full disk or a pulled plug leaves either the old file or the new one, never half of
one. Private keys are created with mode 0600 from the first byte: the temporary file is opened with
that mode, so there is no window in which the key is readable by others.

``cryptography`` is imported only by the functions that handle keys: the device agent writes its
files with :func:`atomic_write` and must not load a second OpenSSL for it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeAlias

from provisioning.errors import PassphraseError, PKIError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    PrivateKey: TypeAlias = (
        ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    )

__all__ = [
    "KEY_MODE",
    "PRIVATE_DIR_MODE",
    "StagedDirectory",
    "atomic_write",
    "fsync_directory",
    "load_private_key",
    "private_key_pem",
]

KEY_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def fsync_directory(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # the umask may have narrowed or (for keys) must not widen it
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Name the file the user knows, not our temporary one.
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key, turning every failure into a one-line PKIError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        msg = f"private key {path} is missing"
        raise PKIError(msg) from None
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted and not passphrase:
        msg = f"{path} is encrypted; set IOTAUTH_CA_PASSPHRASE"
        raise PassphraseError(msg)
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        if encrypted:
            msg = f"cannot decrypt {path}: wrong IOTAUTH_CA_PASSPHRASE"
            raise PassphraseError(msg) from exc
        msg = f"{path} is not a PEM private key"
        raise PKIError(msg) from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        msg = f"{path} holds an unsupported key type"
        raise PKIError(msg)
    return key


class StagedDirectory:
    """Build a directory beside its final place, then move it there in one rename.

    Used for credential directories: a reader (the device agent) either sees the complete set of
    key, certificates and identity, or no directory at all.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            msg = f"{final} already exists and is not empty; refusing to overwrite credentials"
            raise PKIError(msg)
        # Remember which parents we create, so a discarded directory leaves no trace on disk.
        self._created: list[Path] = []
        parent = final.parent
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        final.parent.mkdir(parents=True, exist_ok=True)
        self.path = final.parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
        self.path.mkdir(mode=PRIVATE_DIR_MODE)
        self.committed = False

    def write(self, name: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write one file into the staging directory (durable, but not yet visible).

        No per-file rename is needed: the directory rename in :meth:`commit` is the atomic step.
        """
        try:
            fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(self.path / name, mode)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.final / name)) from exc

    def commit(self) -> None:
        """Rename into place; a second call does nothing (a transaction may run again)."""
        if self.committed:
            return
        fsync_directory(self.path)
        if self.final.is_dir():
            self.final.rmdir()  # empty (checked in __init__); rename cannot replace a directory
        os.rename(self.path, self.final)
        fsync_directory(self.final.parent)
        self.committed = True

    def discard(self) -> None:
        """Remove the staged (or, after commit, the final) directory."""
        target = self.final if self.committed else self.path
        shutil.rmtree(target, ignore_errors=True)
        for parent in self._created:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()

    def __enter__(self) -> StagedDirectory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None or not self.committed:
            self.discard()
