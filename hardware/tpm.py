"""TPM 2.0 device keys for CPython: the project's one low-level binding (ctypes on OpenSSL 3).

What it does
------------
- :meth:`Tpm.generate` makes a P-256 signing key *inside* the TPM and returns its TSS2 PEM blob
  (``-----BEGIN TSS2 PRIVATE KEY-----``): the private part wrapped by the TPM's storage key, which
  only the TPM that made it can load. That blob is what a credential directory keeps as
  ``device.key``; it is useless anywhere else.
- :meth:`Tpm.public_key` loads a blob into the TPM and returns its SubjectPublicKeyInfo (DER); a
  blob made by another TPM fails there, with a reason naming the TCTI and the key.
- :meth:`Tpm.csr` returns a CSR signed by the TPM; :meth:`Tpm.load_cert_chain` gives a stdlib
  ``ssl.SSLContext`` (paho-mqtt takes it as is) a client key whose signatures the TPM makes.

How (and why this way)
----------------------
OpenSSL reaches the TPM through the ``tpm2`` provider (tpm2-openssl). It is loaded only into a
*private* library context for the few calls that must run in the TPM (key generation, loading a
blob, TPM2_Sign), never into the default context that ``ssl`` uses: there, tpm2-openssl 1.1.1
(Debian 12) would take over digests, or claim it can export the private key and let the default
provider's ECDSA fail with "missing private key", or route every ECDSA *verification* to the TPM.
Instead the ``SSL_CTX`` gets a "foreign" EC key: the certificate's public key with an
``EC_KEY_METHOD`` whose sign callback asks the TPM to sign the digest. OpenSSL 3.0 sends foreign
keys down its legacy path, the one the libp11 engine uses, so hashing, ECDH, ciphers, randomness
and certificate checks all stay in the default provider and the TPM performs exactly one
TPM2_Sign per handshake. The CSR is signed the same way (``X509_REQ_sign`` with the foreign key).

Every TPM operation is a short session: load the provider (which connects to the TCTI), do the
work, free the key (the provider flushes its TPM object) and unload the provider (which
disconnects). Nothing stays loaded in the TPM between calls, so a process that dies leaks no
transient objects (a TPM without a resource manager has three slots), and a TPM that serves one
connection at a time (swtpm; ``/dev/tpm0``) is free for the renewal child or another process
between two handshakes. The cost is a reconnect and a re-load per signature (see BENCHMARKS.md).

Dependencies (checked at run time, one-line :class:`TpmError` otherwise): CPython (the
``SSL_CTX*`` is read from the ``ssl.SSLContext`` object, whose layout is checked against
``SSL_CTX_get_options``), the OpenSSL 3 that ``ssl`` is linked against (Debian 12: 3.0), the
``tpm2`` provider (Debian 12: tpm2-openssl 1.1.1) and the TSS2 TCTI for the chosen TPM
(``libtss2-tcti-device0``, or ``libtss2-tcti-swtpm0`` for a software TPM). The provider reads its
TCTI only from ``TPM2OPENSSL_TCTI`` (its configuration parameter is broken in 1.1.1), so this
module sets that variable, under a lock, for the moment the provider loads. The ``EC_KEY_*`` calls
are deprecated in OpenSSL 3 but present in every 3.x; a CI run against swtpm guards them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import ssl
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hardware.errors import HardwareError

__all__ = [
    "DEFAULT_TCTI",
    "TCTI_ENV",
    "TSS2_PEM_HEADER",
    "Tpm",
    "TpmError",
    "certificate_public_key",
    "is_tpm_blob",
    "resolve_tcti",
]

DEFAULT_TCTI = "device:/dev/tpmrm0"
TCTI_ENV = "IOTAUTH_TPM_TCTI"
TSS2_PEM_HEADER = b"-----BEGIN TSS2 PRIVATE KEY-----"
_PROVIDER_TCTI_ENV = "TPM2OPENSSL_TCTI"
_log = logging.getLogger(__name__)
# The TSS libraries log to stderr by default; a failure reaches the user as one TpmError line.
_TSS_LOG_ENV = "TSS2_LOG"

_P = ctypes.c_void_p
_S = ctypes.c_char_p
_INT = ctypes.c_int
_SIGN_CB = ctypes.CFUNCTYPE(_INT, _INT, _P, _INT, _P, ctypes.POINTER(ctypes.c_uint), _P, _P, _P)
_BIO_CTRL_INFO = 3  # BIO_get_mem_data is BIO_ctrl(bio, BIO_CTRL_INFO, 0, &ptr)
_MBSTRING_ASC = 0x1001
_NID_SUBJECT_ALT_NAME = 85
_DIGESTS = {20: b"SHA1", 32: b"SHA256", 48: b"SHA384", 64: b"SHA512"}


class TpmError(HardwareError, OSError):
    """The TPM is absent, busy or unusable, or a key does not belong to it (one line).

    Also an ``OSError``: to the responder and the agent the TPM is device storage that failed.
    """

    def __init__(self, tcti: str, reason: str, *, key: str | None = None) -> None:
        self.tcti = tcti
        self.key = key
        self.reason = reason
        where = f"TPM at {tcti}" + (f", key {key}" if key else "")
        super().__init__(f"{where}: {reason}")


def resolve_tcti(tcti: str | None = None) -> str:
    """``tcti``, else ``$IOTAUTH_TPM_TCTI``, else ``device:/dev/tpmrm0`` (the kernel's RM)."""
    return tcti or os.environ.get(TCTI_ENV) or DEFAULT_TCTI


def is_tpm_blob(data: bytes) -> bool:
    return data.lstrip().startswith(TSS2_PEM_HEADER)


# -- the C functions, bound once on first use -----------------------------------------------------

_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "OSSL_LIB_CTX_new": (_P, ()),
    "OSSL_LIB_CTX_free": (None, (_P,)),
    "OSSL_PROVIDER_load": (_P, (_P, _S)),
    "OSSL_PROVIDER_unload": (_INT, (_P,)),
    "ERR_get_error": (ctypes.c_ulong, ()),
    "ERR_error_string_n": (None, (ctypes.c_ulong, _P, ctypes.c_size_t)),
    "ERR_clear_error": (None, ()),
    "BIO_s_mem": (_P, ()),
    "BIO_new": (_P, (_P,)),
    "BIO_new_mem_buf": (_P, (_P, _INT)),
    "BIO_ctrl": (ctypes.c_long, (_P, _INT, ctypes.c_long, _P)),
    "BIO_free": (_INT, (_P,)),
    "EVP_PKEY_CTX_new_from_name": (_P, (_P, _S, _S)),
    "EVP_PKEY_CTX_new_from_pkey": (_P, (_P, _P, _S)),
    "EVP_PKEY_CTX_free": (None, (_P,)),
    "EVP_PKEY_keygen_init": (_INT, (_P,)),
    "EVP_PKEY_CTX_set_group_name": (_INT, (_P, _S)),
    "EVP_PKEY_generate": (_INT, (_P, ctypes.POINTER(_P))),
    "EVP_PKEY_sign_init": (_INT, (_P,)),
    "EVP_PKEY_CTX_set_signature_md": (_INT, (_P, _P)),
    "EVP_get_digestbyname": (_P, (_S,)),
    "EVP_sha256": (_P, ()),
    "EVP_PKEY_sign": (_INT, (_P, _P, ctypes.POINTER(ctypes.c_size_t), _P, ctypes.c_size_t)),
    "EVP_PKEY_new": (_P, ()),
    "EVP_PKEY_free": (None, (_P,)),
    "PEM_write_bio_PrivateKey": (_INT, (_P, _P, _P, _P, _INT, _P, _P)),
    "PEM_read_bio_PrivateKey_ex": (_P, (_P, _P, _P, _P, _P, _S)),
    "PEM_read_bio_X509": (_P, (_P, _P, _P, _P)),
    "X509_get0_pubkey": (_P, (_P,)),
    "X509_free": (None, (_P,)),
    "i2d_PUBKEY": (_INT, (_P, _P)),
    "d2i_PUBKEY": (_P, (_P, _P, ctypes.c_long)),
    "EVP_PKEY_get1_EC_KEY": (_P, (_P,)),
    "EVP_PKEY_set1_EC_KEY": (_INT, (_P, _P)),
    "EC_KEY_dup": (_P, (_P,)),
    "EC_KEY_free": (None, (_P,)),
    "EC_KEY_OpenSSL": (_P, ()),
    "EC_KEY_METHOD_new": (_P, (_P,)),
    "EC_KEY_METHOD_get_sign": (None, (_P, _P, ctypes.POINTER(_P), ctypes.POINTER(_P))),
    "EC_KEY_METHOD_set_sign": (None, (_P, _SIGN_CB, _P, _P)),
    "EC_KEY_set_method": (_INT, (_P, _P)),
    "X509_REQ_new": (_P, ()),
    "X509_REQ_free": (None, (_P,)),
    "X509_REQ_set_version": (_INT, (_P, ctypes.c_long)),
    "X509_REQ_get_subject_name": (_P, (_P,)),
    "X509_NAME_add_entry_by_txt": (_INT, (_P, _S, _INT, _S, _INT, _INT, _INT)),
    "X509_REQ_set_pubkey": (_INT, (_P, _P)),
    "X509V3_EXT_conf_nid": (_P, (_P, _P, _INT, _S)),
    "X509_EXTENSION_free": (None, (_P,)),
    "OPENSSL_sk_new_null": (_P, ()),
    "OPENSSL_sk_push": (_INT, (_P, _P)),
    "OPENSSL_sk_free": (None, (_P,)),
    "X509_REQ_add_extensions": (_INT, (_P, _P)),
    "X509_REQ_sign": (_INT, (_P, _P, _P)),
    "i2d_X509_REQ": (_INT, (_P, _P)),
}
_SSL_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "SSL_CTX_get_options": (ctypes.c_uint64, (_P,)),
    "SSL_CTX_use_certificate_chain_file": (_INT, (_P, _S)),
    "SSL_CTX_get0_certificate": (_P, (_P,)),
    "SSL_CTX_use_PrivateKey": (_INT, (_P, _P)),
    "SSL_CTX_check_private_key": (_INT, (_P,)),
}


class _Lib:
    """The libcrypto and libssl that this interpreter's ``ssl`` module is linked against."""

    def __init__(self) -> None:
        if ssl.OPENSSL_VERSION_INFO < (3, 0):
            msg = f"needs OpenSSL 3 behind Python's ssl module, found {ssl.OPENSSL_VERSION}"
            raise OSError(msg)
        crypto, libssl = _mapped("libcrypto"), _mapped("libssl")
        self.f: dict[str, Any] = {}
        for lib, table in ((crypto, _SIGNATURES), (libssl, _SSL_SIGNATURES)):
            for name, (restype, argtypes) in table.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = list(argtypes)
                self.f[name] = fn

    def errors(self) -> str:
        """OpenSSL's error queue as one line (and the queue emptied)."""
        seen: list[str] = []
        buf = ctypes.create_string_buffer(256)
        while code := self.f["ERR_get_error"]():
            self.f["ERR_error_string_n"](code, buf, len(buf))
            text = buf.value.decode(errors="replace")
            # "error:80000000:tpm2::cannot connect" -> "tpm2::cannot connect"
            short = text.split(":", 2)[-1] if text.startswith("error:") else text
            if short not in seen:
                seen.append(short)
        return "; ".join(seen) or "no detail from OpenSSL"


def _mapped(stem: str) -> ctypes.CDLL:
    """The shared library ``stem`` as already mapped into this process by ``_ssl``."""
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            path = line.rsplit(None, 1)[-1]
            if path.rsplit("/", 1)[-1].startswith(stem + ".so"):
                return ctypes.CDLL(path)
    msg = f"{stem} is not loaded by Python's ssl module"
    raise OSError(msg)


_lib: _Lib | None = None
_lib_lock = threading.Lock()
# One TPM session at a time in this process: the provider's TCTI comes from an environment
# variable that is read while it loads, and a TPM without a resource manager serves one
# connection at a time anyway.
_session_lock = threading.RLock()


def _bound() -> _Lib:
    global _lib  # noqa: PLW0603 - bound once per process, on first use
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


def _der(lib: _Lib, fn: str, obj: int) -> bytes:
    """``i2d_*`` into Python bytes (the two-call idiom: size first)."""
    size = lib.f[fn](obj, None)
    if size <= 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buf))
    written = lib.f[fn](obj, ctypes.byref(cursor))
    return buf.raw[:written]


def _read_bio(lib: _Lib, bio: int) -> bytes:
    data = ctypes.c_void_p()
    size = lib.f["BIO_ctrl"](bio, _BIO_CTRL_INFO, 0, ctypes.byref(data))
    return ctypes.string_at(data.value, size) if size > 0 and data.value else b""


class _Session:
    """One connection to the TPM: a private library context with the tpm2 provider loaded."""

    def __init__(self, lib: _Lib, tcti: str, libctx: int) -> None:
        self.lib = lib
        self.tcti = tcti
        self.libctx = libctx

    def load(self, blob: bytes, name: str) -> int:
        """The blob loaded into the TPM (an ``EVP_PKEY*`` of the tpm2 provider; caller frees)."""
        f = self.lib.f
        if not is_tpm_blob(blob):
            raise TpmError(self.tcti, "not a TSS2 PEM key blob", key=name)
        buf = ctypes.create_string_buffer(blob, len(blob))
        bio = f["BIO_new_mem_buf"](buf, len(blob))
        try:
            pkey = f["PEM_read_bio_PrivateKey_ex"](bio, None, None, None, self.libctx, None)
        finally:
            f["BIO_free"](bio)
        if not pkey:
            detail = self.lib.errors()
            raise TpmError(
                self.tcti, f"cannot load the key (made by another TPM?): {detail}", key=name
            )
        return int(pkey)

    def sign(self, pkey: int, digest: bytes, name: str) -> bytes:
        """TPM2_Sign over ``digest``: a DER ECDSA-Sig-Value."""
        f = self.lib.f
        md = _DIGESTS.get(len(digest))
        if md is None:
            raise TpmError(self.tcti, f"no hash has a {len(digest)}-byte digest", key=name)
        ctx = f["EVP_PKEY_CTX_new_from_pkey"](self.libctx, pkey, None)
        if not ctx:
            raise TpmError(self.tcti, f"cannot sign: {self.lib.errors()}", key=name)
        try:
            out = ctypes.create_string_buffer(256)
            size = ctypes.c_size_t(len(out))
            if (
                f["EVP_PKEY_sign_init"](ctx) != 1
                or f["EVP_PKEY_CTX_set_signature_md"](ctx, f["EVP_get_digestbyname"](md)) != 1
                or f["EVP_PKEY_sign"](ctx, out, ctypes.byref(size), digest, len(digest)) != 1
            ):
                raise TpmError(self.tcti, f"signing failed: {self.lib.errors()}", key=name)
            return out.raw[: size.value]
        finally:
            f["EVP_PKEY_CTX_free"](ctx)


class Tpm:
    """A TPM reached through a TSS2 TCTI string (``device:/dev/tpmrm0``, ``swtpm:port=2321``)."""

    def __init__(self, tcti: str | None = None) -> None:
        self.tcti = resolve_tcti(tcti)

    def __repr__(self) -> str:
        return f"Tpm({self.tcti!r})"

    @contextlib.contextmanager
    def _session(self, key: str | None = None) -> Iterator[_Session]:
        try:
            lib = _bound()
        except (OSError, AttributeError) as exc:
            raise TpmError(self.tcti, f"no usable OpenSSL binding: {exc}", key=key) from None
        with _session_lock:
            f = lib.f
            f["ERR_clear_error"]()
            libctx = f["OSSL_LIB_CTX_new"]()
            if not libctx:
                raise TpmError(self.tcti, "out of memory", key=key)
            provider = None
            try:
                os.environ.setdefault(_TSS_LOG_ENV, "all+NONE")
                previous = os.environ.get(_PROVIDER_TCTI_ENV)
                os.environ[_PROVIDER_TCTI_ENV] = self.tcti
                try:
                    provider = f["OSSL_PROVIDER_load"](libctx, b"tpm2")
                    base = f["OSSL_PROVIDER_load"](libctx, b"base")  # PEM decoding
                finally:
                    if previous is None:
                        del os.environ[_PROVIDER_TCTI_ENV]
                    else:
                        os.environ[_PROVIDER_TCTI_ENV] = previous
                if not provider or not base:
                    raise TpmError(self.tcti, _open_failure(self.tcti, lib.errors()), key=key)
                yield _Session(lib, self.tcti, libctx)
            finally:
                # Unloading the provider closes its TCTI connection; the libctx goes last.
                if provider:
                    f["OSSL_PROVIDER_unload"](provider)
                f["OSSL_LIB_CTX_free"](libctx)
                f["ERR_clear_error"]()

    def check(self) -> None:
        """Connect once: TpmError if the TPM cannot be reached."""
        with self._session():
            pass

    def generate(self) -> bytes:
        """A new ECDSA P-256 key inside the TPM; returns its TSS2 PEM blob."""
        with self._session() as s:
            f = s.lib.f
            ctx = f["EVP_PKEY_CTX_new_from_name"](s.libctx, b"EC", b"provider=tpm2")
            pkey = _P()
            try:
                if (
                    not ctx
                    or f["EVP_PKEY_keygen_init"](ctx) != 1
                    or f["EVP_PKEY_CTX_set_group_name"](ctx, b"P-256") != 1
                    or f["EVP_PKEY_generate"](ctx, ctypes.byref(pkey)) != 1
                ):
                    raise TpmError(self.tcti, f"key generation failed: {s.lib.errors()}")
                bio = f["BIO_new"](f["BIO_s_mem"]())
                try:
                    ok = f["PEM_write_bio_PrivateKey"](bio, pkey, None, None, 0, None, None)
                    blob = _read_bio(s.lib, bio) if ok == 1 else b""
                finally:
                    f["BIO_free"](bio)
            finally:
                if pkey.value:
                    f["EVP_PKEY_free"](pkey)  # flushes the TPM object
                if ctx:
                    f["EVP_PKEY_CTX_free"](ctx)
            if not is_tpm_blob(blob):
                raise TpmError(self.tcti, f"cannot encode the new key: {s.lib.errors()}")
            return blob

    def public_key(self, blob: bytes, *, name: str = "device.key") -> bytes:
        """The blob's SubjectPublicKeyInfo (DER), read by loading it into this TPM."""
        with self._session(name) as s:
            pkey = s.load(blob, name)
            try:
                spki = _der(s.lib, "i2d_PUBKEY", pkey)
            finally:
                s.lib.f["EVP_PKEY_free"](pkey)
        if not spki:
            raise TpmError(self.tcti, "cannot read the public key", key=name)
        return spki

    def sign_digest(self, blob: bytes, digest: bytes, *, name: str = "device.key") -> bytes:
        """An ECDSA signature (DER) of ``digest`` by the blob's key, made inside the TPM."""
        with self._session(name) as s:
            pkey = s.load(blob, name)
            try:
                return s.sign(pkey, digest, name)
            finally:
                s.lib.f["EVP_PKEY_free"](pkey)

    def csr(
        self, blob: bytes, common_name: str, *, uri: str | None = None, name: str = "device.key"
    ) -> bytes:
        """A CSR (DER, SHA-256) for the blob's key with subject CN and an optional SAN URI."""
        public = self.public_key(blob, name=name)  # first: a TpmError names TPM and key
        lib = _bound()
        f = lib.f
        foreign = _ForeignKey(self, blob, name, public)
        req = f["X509_REQ_new"]()
        try:
            subject = f["X509_REQ_get_subject_name"](req)
            ok = (
                f["X509_REQ_set_version"](req, 0) == 1
                and f["X509_NAME_add_entry_by_txt"](
                    subject, b"CN", _MBSTRING_ASC, common_name.encode(), -1, -1, 0
                )
                == 1
                and f["X509_REQ_set_pubkey"](req, foreign.pkey) == 1
            )
            if ok and uri is not None:
                ok = _add_san_uri(lib, req, uri)
            if not ok or f["X509_REQ_sign"](req, foreign.pkey, f["EVP_sha256"]()) <= 0:
                detail = foreign.failure or lib.errors()
                raise TpmError(self.tcti, f"cannot sign the CSR: {detail}", key=name)
            return _der(lib, "i2d_X509_REQ", req)
        finally:
            f["X509_REQ_free"](req)
            foreign.free()
            _FOREIGN.pop(foreign.eckey, None)

    def load_cert_chain(self, ctx: ssl.SSLContext, cert_chain: Path, key: Path) -> None:
        """Like ``ctx.load_cert_chain(cert_chain, key)``, with ``key`` a blob of this TPM.

        The key is loaded into the TPM once here, to prove it belongs to this TPM and to the
        certificate (TpmError / ValueError otherwise); each handshake then costs one TPM2_Sign.
        """
        name = key.name
        try:
            blob = key.read_bytes()
            cert_pem = cert_chain.read_bytes()
        except OSError as exc:
            raise TpmError(self.tcti, f"cannot read: {exc}", key=name) from None
        public = self.public_key(blob, name=name)
        if public != certificate_public_key(cert_pem):
            msg = f"{name} (a key of the TPM at {self.tcti}) does not belong to {cert_chain.name}"
            raise ValueError(msg)
        lib = _bound()
        f = lib.f
        raw = _ssl_ctx(lib, ctx)
        if f["SSL_CTX_use_certificate_chain_file"](raw, str(cert_chain).encode()) != 1:
            msg = f"cannot load {cert_chain.name}: {lib.errors()}"
            raise ValueError(msg)
        foreign = _ForeignKey(self, blob, name, public)
        try:
            if (
                f["SSL_CTX_use_PrivateKey"](raw, foreign.pkey) != 1
                or f["SSL_CTX_check_private_key"](raw) != 1
            ):
                msg = f"cannot use {name} with {cert_chain.name}: {lib.errors()}"
                raise ValueError(msg)
        finally:
            foreign.free()  # the SSL_CTX holds its own reference to the EVP_PKEY
        # The callback and its EC_KEY_METHOD must live as long as the context.
        _keep_alive(ctx, foreign)


def _open_failure(tcti: str, detail: str) -> str:
    """Why the provider did not load, in words (its own reason strings die with it)."""
    if "DSO" in detail or "shared library" in detail:
        return f"cannot load the tpm2 provider (is tpm2-openssl installed?): {detail}"
    kind, _, conf = tcti.partition(":")
    if kind == "device":
        path = conf or "/dev/tpm0"
        if not os.path.exists(path):
            return f"{path} does not exist (no TPM, or its device-tree overlay is not enabled)"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"no permission to use {path} (add the user to the tss group)"
        return f"{path} does not answer (busy: use /dev/tpmrm0, not /dev/tpm0)"
    return "no TPM answers there (absent, or busy with another client)"


def certificate_public_key(cert_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of the first certificate in ``cert_pem``."""
    lib = _bound()
    f = lib.f
    buf = ctypes.create_string_buffer(cert_pem, len(cert_pem))
    bio = f["BIO_new_mem_buf"](buf, len(cert_pem))
    try:
        x509 = f["PEM_read_bio_X509"](bio, None, None, None)
    finally:
        f["BIO_free"](bio)
    if not x509:
        lib.errors()
        msg = "not a PEM certificate"
        raise ValueError(msg)
    try:
        return _der(lib, "i2d_PUBKEY", f["X509_get0_pubkey"](x509))
    finally:
        f["X509_free"](x509)


def _add_san_uri(lib: _Lib, req: int, uri: str) -> bool:
    f = lib.f
    ext = f["X509V3_EXT_conf_nid"](None, None, _NID_SUBJECT_ALT_NAME, b"URI:" + uri.encode())
    if not ext:
        return False
    stack = f["OPENSSL_sk_new_null"]()
    try:
        return bool(
            stack
            and f["OPENSSL_sk_push"](stack, ext) > 0
            and f["X509_REQ_add_extensions"](req, stack) == 1
        )
    finally:
        if stack:
            f["OPENSSL_sk_free"](stack)
        f["X509_EXTENSION_free"](ext)


def _ssl_ctx(lib: _Lib, ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX*`` inside a CPython ``ssl.SSLContext`` (the first field after the header)."""
    raw = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not raw or lib.f["SSL_CTX_get_options"](raw) != int(ctx.options):
        msg = "this Python's ssl.SSLContext layout is not the one expected (CPython only)"
        raise ValueError(msg)
    return int(raw)


# -- the foreign key: an EC_KEY whose signatures come from the TPM ---------------------------------

# EC_KEY* address -> the key it signs for. The one C callback below looks the key up here.
_FOREIGN: dict[int, _ForeignKey] = {}
_method: int | None = None


@_SIGN_CB  # type: ignore[untyped-decorator]
def _sign_callback(
    _type: int,
    dgst: int,
    dlen: int,
    sig: int,
    siglen: ctypes._Pointer[ctypes.c_uint],
    _kinv: int,
    _r: int,
    eckey: int,
) -> int:
    key = _FOREIGN.get(eckey)
    if key is None:
        return 0
    try:
        der = key.tpm.sign_digest(key.blob, ctypes.string_at(dgst, dlen), name=key.name)
    except Exception as exc:  # noqa: BLE001 - an exception must not cross back into OpenSSL
        # OpenSSL only learns "failed" (the handshake fails with a generic error): the reason is
        # logged in one line and kept for whoever reports it.
        key.failure = str(exc)
        _log.warning("%s", exc)
        return 0
    ctypes.memmove(sig, der, len(der))
    siglen[0] = len(der)
    return 1


def _ec_method(lib: _Lib) -> int:
    """One EC_KEY_METHOD per process: OpenSSL's own, with signing replaced by the TPM."""
    global _method  # noqa: PLW0603 - made once, kept for the life of the process
    if _method is None:
        f = lib.f
        meth = f["EC_KEY_METHOD_new"](f["EC_KEY_OpenSSL"]())
        setup, sign_sig = _P(), _P()
        f["EC_KEY_METHOD_get_sign"](meth, None, ctypes.byref(setup), ctypes.byref(sign_sig))
        f["EC_KEY_METHOD_set_sign"](meth, _sign_callback, setup, sign_sig)
        _method = int(meth)
    return _method


class _ForeignKey:
    """An ``EVP_PKEY*`` holding ``public`` whose ECDSA signatures the TPM makes."""

    def __init__(self, tpm: Tpm, blob: bytes, name: str, public: bytes) -> None:
        self.tpm = tpm
        self.blob = blob
        self.name = name
        self.failure: str | None = None
        lib = _bound()
        f = lib.f
        buf = ctypes.create_string_buffer(public, len(public))
        cursor = ctypes.c_void_p(ctypes.addressof(buf))
        pub = f["d2i_PUBKEY"](None, ctypes.byref(cursor), len(public))
        ec_src = f["EVP_PKEY_get1_EC_KEY"](pub) if pub else None
        if pub:
            f["EVP_PKEY_free"](pub)
        if not ec_src:
            lib.errors()
            raise TpmError(tpm.tcti, "the key is not an EC key", key=name)
        eckey = f["EC_KEY_dup"](ec_src)
        f["EC_KEY_free"](ec_src)
        self.pkey = f["EVP_PKEY_new"]()
        if (
            not eckey
            or f["EC_KEY_set_method"](eckey, _ec_method(lib)) != 1
            or f["EVP_PKEY_set1_EC_KEY"](self.pkey, eckey) != 1
        ):
            f["EC_KEY_free"](eckey)
            f["EVP_PKEY_free"](self.pkey)
            raise TpmError(tpm.tcti, f"cannot wrap the key: {lib.errors()}", key=name)
        self.eckey = int(eckey)
        f["EC_KEY_free"](eckey)  # the EVP_PKEY holds a reference
        _FOREIGN[self.eckey] = self

    def free(self) -> None:
        """Drop our reference; the EC_KEY lives on while an SSL_CTX holds the EVP_PKEY."""
        if self.pkey:
            _bound().f["EVP_PKEY_free"](self.pkey)
            self.pkey = None


def _keep_alive(ctx: ssl.SSLContext, key: _ForeignKey) -> None:
    # The registry entry goes when the context does (a freed EC_KEY's address may be reused).
    weakref.finalize(ctx, _FOREIGN.pop, key.eckey, None)
