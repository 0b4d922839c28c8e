"""CA keys in a PKCS#11 token (an HSM, a smart card, a cloud KMS's PKCS#11 library).

The one module that talks PKCS#11, through python-pkcs11 (imported only when a token is used: the
``hsm`` extra). A key is named by an RFC 7512 URI::

    pkcs11:token=iotauth-ca;object=issuing?module-path=/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so

The module comes from the URI's ``module-path`` or ``IOTAUTH_PKCS11_MODULE``; the user PIN only
from ``IOTAUTH_PKCS11_PIN`` (never an argument, never the URI, so it stays out of shell history,
``ps`` and ``pki.toml``).

Only standard PKCS#11 is used, so any token works: keys are made with CKM_EC_KEY_PAIR_GEN on
P-256 as token objects that are private, sensitive and never extractable; signing is CKM_ECDSA
over a SHA-256 digest computed here (the one ECDSA mechanism every token offers: Nitrokey HSM and
cloud KMS libraries have no CKM_ECDSA_SHA256), and the raw r||s that PKCS#11 returns becomes DER
with ``cryptography``'s ``encode_dss_signature``.

A module is initialized (C_Initialize) when the first key of this process opens on it and
finalized when the last one closes, so a token plugged in (or initialized) after a previous
open is found at the next open.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from provisioning.errors import PKIError, TokenError
from provisioning.signing import ExternalSigner

__all__ = [
    "MODULE_ENV",
    "PIN_ENV",
    "Pkcs11Signer",
    "Pkcs11URI",
    "generate_key",
    "open_key",
]

PIN_ENV = "IOTAUTH_PKCS11_PIN"
MODULE_ENV = "IOTAUTH_PKCS11_MODULE"

# RFC 7512 path attributes iotauth understands; the others select by things a CA key has no use
# for (manufacturer, model, library ...), and a URI that uses them is refused rather than
# silently matching more than the user meant.
_PATH_ATTRS = ("token", "object", "id", "serial", "type")
_QUERY_ATTRS = ("module-path",)
_SECRET_ATTRS = ("pin-value", "pin-source")
_UNRESERVED = "-._~"


@dataclass(frozen=True, slots=True)
class Pkcs11URI:
    """The parts of an RFC 7512 ``pkcs11:`` URI that name one private key."""

    token: str
    object: str
    id: bytes | None = None
    serial: str | None = None
    module_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11URI:
        """Parse and check a URI; every problem is one :class:`PKIError` naming the fix."""
        scheme, sep, rest = text.partition(":")
        if scheme.lower() != "pkcs11" or not sep:
            msg = f"{text!r} is not a PKCS#11 URI; write pkcs11:token=LABEL;object=NAME"
            raise PKIError(msg)
        path, _, query = rest.partition("?")
        attrs: dict[str, str] = {}
        for part, allowed, sep_char in ((path, _PATH_ATTRS, ";"), (query, _QUERY_ATTRS, "&")):
            for item in filter(None, part.split(sep_char)):
                name, eq, raw = item.partition("=")
                name = name.lower()
                if name in _SECRET_ATTRS:
                    msg = f"the PKCS#11 URI holds {name}; give the PIN in {PIN_ENV} only"
                    raise PKIError(msg)
                if name == "module-path" and allowed is _PATH_ATTRS:
                    msg = (
                        "module-path is a query attribute: write "
                        "pkcs11:token=LABEL;object=NAME?module-path=/path/to/module.so"
                    )
                    raise PKIError(msg)
                if not eq or name not in allowed:
                    msg = (
                        f"PKCS#11 URI attribute {item!r} is not supported; "
                        "use token=, object=, id=, serial= and ?module-path="
                    )
                    raise PKIError(msg)
                if name in attrs:
                    msg = f"the PKCS#11 URI gives {name}= twice"
                    raise PKIError(msg)
                attrs[name] = raw
        try:
            values = {
                k: urllib.parse.unquote(v, errors="strict") for k, v in attrs.items() if k != "id"
            }
            key_id = urllib.parse.unquote_to_bytes(attrs["id"]) if "id" in attrs else None
        except UnicodeDecodeError:
            msg = f"the PKCS#11 URI {text!r} has a percent-encoded value that is not UTF-8"
            raise PKIError(msg) from None
        for required in ("token", "object"):
            if not values.get(required):
                msg = (
                    f"the PKCS#11 URI {text!r} needs {required}=; "
                    "write pkcs11:token=LABEL;object=NAME"
                )
                raise PKIError(msg)
        if values.get("type", "private") != "private":
            msg = "the PKCS#11 URI names a CA key: type= may only be 'private'"
            raise PKIError(msg)
        return cls(
            token=values["token"],
            object=values["object"],
            id=key_id,
            serial=values.get("serial"),
            module_path=values.get("module-path"),
        )

    def __str__(self) -> str:
        """The canonical form (percent-encoded, no quotes or backslashes: safe in pki.toml)."""
        parts = [f"token={_quote(self.token)}", f"object={_quote(self.object)}"]
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        if self.serial is not None:
            parts.append(f"serial={_quote(self.serial)}")
        text = "pkcs11:" + ";".join(parts)
        if self.module_path:
            text += "?module-path=" + urllib.parse.quote(self.module_path, safe="/" + _UNRESERVED)
        return text

    def module(self) -> str:
        module = self.module_path or os.environ.get(MODULE_ENV)
        if not module:
            msg = (
                f"no PKCS#11 module for {self}: add ?module-path=/path/to/module.so to the URI "
                f"or set {MODULE_ENV}"
            )
            raise PKIError(msg)
        return module

    def describe(self) -> str:
        return f"key '{self.object}' in PKCS#11 token '{self.token}'"


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe=_UNRESERVED)


def _pin(uri: Pkcs11URI) -> str:
    pin = os.environ.get(PIN_ENV)
    if not pin:
        msg = (
            f"set {PIN_ENV} to the user PIN of PKCS#11 token '{uri.token}' "
            "(it is read from the environment only)"
        )
        raise TokenError(msg)
    return pin


# -- modules: one C_Initialize per module while keys are open on it ---------------------------


@dataclass(slots=True)
class _Module:
    lib: Any
    users: int = 0
    # Without locking callbacks in C_Initialize a module may assume one thread at a time: every
    # call into it is made under this lock.
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Login state belongs to the token, not the session (PKCS#11 v2.40, 5.6): per token, one
    # session of ours holds the login while any key is open on it; the keys' own sessions open
    # without a PIN and share it. python-pkcs11 logs out when the session that logged in closes,
    # so that session must not be any one key's.
    logins: dict[tuple[str, str | None], _Login] = field(default_factory=dict)


@dataclass(slots=True)
class _Login:
    session: Any
    keys: int = 0


class _Modules:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, _Module] = {}

    def acquire(self, path: str) -> _Module:
        """The first step of every use of a token: the other imports of pkcs11 come after it."""
        try:
            import pkcs11
        except ImportError:
            msg = "a CA key in a PKCS#11 token needs python-pkcs11: pip install 'iotauth[hsm]'"
            raise TokenError(msg) from None
        with self._lock:
            module = self._open.get(path)
            if module is None:
                try:
                    module = _Module(pkcs11.lib(path))
                except pkcs11.PKCS11Error as exc:
                    reason = str(exc).rsplit(": ", 1)[-1] or type(exc).__name__
                    msg = (
                        f"cannot load PKCS#11 module {path}: {reason}; fix ?module-path= in the "
                        f"URI or {MODULE_ENV}"
                    )
                    raise TokenError(msg) from None
                self._open[path] = module
            module.users += 1
            return module

    def release(self, path: str) -> None:
        import pkcs11

        with self._lock:
            module = self._open.get(path)
            if module is None:
                return
            module.users -= 1
            if module.users > 0:
                return
            del self._open[path]
            with module.lock, contextlib.suppress(pkcs11.PKCS11Error):
                module.lib.finalize()


_modules = _Modules()


@contextlib.contextmanager
def _token_errors(uri: Pkcs11URI, doing: str) -> Iterator[None]:
    """Turn a PKCS#11 failure into one line that names the token, the key and the fix."""
    import pkcs11

    try:
        yield
    except pkcs11.PinIncorrect:
        msg = f"PKCS#11 token '{uri.token}' refused the PIN: {PIN_ENV} is wrong"
        raise TokenError(msg) from None
    except pkcs11.PinLocked:
        msg = (
            f"the user PIN of PKCS#11 token '{uri.token}' is locked; "
            "unlock it with the token's tools"
        )
        raise TokenError(msg) from None
    except (pkcs11.PinLenRange, pkcs11.PinInvalid):
        msg = (
            f"PKCS#11 token '{uri.token}' does not accept {PIN_ENV} as a PIN (length or characters)"
        )
        raise TokenError(msg) from None
    except pkcs11.MultipleTokensReturned:
        msg = f"several PKCS#11 tokens are labelled '{uri.token}'; add serial= to the URI"
        raise TokenError(msg) from None
    except pkcs11.MultipleObjectsReturned:
        msg = (
            f"PKCS#11 token '{uri.token}' holds several keys labelled '{uri.object}'; "
            "add id= to the URI"
        )
        raise TokenError(msg) from None
    except pkcs11.PKCS11Error as exc:
        detail = f" ({exc})" if str(exc) else ""
        msg = f"PKCS#11 token '{uri.token}' failed while {doing}: {type(exc).__name__}{detail}"
        raise TokenError(msg) from None


def _find_token(lib: Any, uri: Pkcs11URI, module: str) -> Any:  # noqa: ANN401
    import pkcs11

    query: dict[str, Any] = {"token_label": uri.token}
    if uri.serial is not None:
        query["token_serial"] = uri.serial.encode()
    try:
        return lib.get_token(**query)
    except pkcs11.NoSuchToken:
        labels = sorted(repr(slot.get_token().label) for slot in lib.get_slots(token_present=True))
        present = f" (tokens present: {', '.join(labels)})" if labels else " (no token present)"
        serial = f" with serial {uri.serial}" if uri.serial else ""
        msg = (
            f"no PKCS#11 token labelled '{uri.token}'{serial} in {module}{present}; "
            "fix token= in the URI"
        )
        raise TokenError(msg) from None


def _ec_point(raw: bytes, uri: Pkcs11URI) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT is a DER OCTET STRING around the point; a few tokens give the bare point."""
    from asn1crypto.core import OctetString

    try:
        point = raw if len(raw) == 65 and raw[0] == 4 else OctetString.load(raw).native
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except (ValueError, TypeError):
        msg = f"{uri.describe()} is not a P-256 key; iotauth signs with P-256 only"
        raise TokenError(msg) from None


class Pkcs11Signer(ExternalSigner):
    """A P-256 private key in a token, logged in for as long as this object is open."""

    def __init__(
        self, uri: Pkcs11URI, *, public_key: ec.EllipticCurvePublicKey | None, rw: bool = False
    ) -> None:
        self.uri = uri
        self.location = str(uri)
        path = uri.module()
        self._path = path
        self._public = public_key
        self._session: Any = None
        self._key: Any = None
        self._created: list[Any] = []
        self._login = (uri.token, uri.serial)
        self._module = _modules.acquire(path)
        try:
            pin = _pin(uri)
            with self._module.lock, _token_errors(uri, "finding the token"):
                token = _find_token(self._module.lib, uri, path)
                login = self._module.logins.get(self._login) or _Login(self._log_in(token, pin))
                self._module.logins[self._login] = login
                login.keys += 1
                try:
                    with _token_errors(uri, "opening a session"):
                        self._session = token.open(rw=rw)
                except BaseException:
                    self._logged_out()
                    raise
        except BaseException:
            _modules.release(path)
            raise

    def _log_in(self, token: Any, pin: str) -> Any:  # noqa: ANN401
        import pkcs11

        with _token_errors(self.uri, "logging in"):
            try:
                return token.open(user_pin=pin)
            except pkcs11.UserAlreadyLoggedIn:  # by code of this process that is not ours
                return token.open()

    def _logged_out(self) -> None:
        """This key no longer needs the login; the last one to go logs the token out."""
        login = self._module.logins[self._login]
        login.keys -= 1
        if login.keys == 0:
            del self._module.logins[self._login]
            with contextlib.suppress(Exception):
                login.session.close()

    # -- finding and making keys ---------------------------------------------------------------

    def _objects(self, object_class: Any) -> list[Any]:  # noqa: ANN401
        import pkcs11

        attrs: dict[Any, Any] = {
            pkcs11.Attribute.CLASS: object_class,
            pkcs11.Attribute.LABEL: self.uri.object,
        }
        if self.uri.id is not None:
            attrs[pkcs11.Attribute.ID] = self.uri.id
        return list(self._session.get_objects(attrs))

    def _load(self) -> None:
        import pkcs11

        with self._module.lock, _token_errors(self.uri, "looking up the key"):
            keys = self._objects(pkcs11.ObjectClass.PRIVATE_KEY)
            if not keys:
                msg = (
                    f"PKCS#11 token '{self.uri.token}' has no private key labelled "
                    f"'{self.uri.object}'; fix object= in the URI"
                )
                raise TokenError(msg)
            if len(keys) > 1:
                raise pkcs11.MultipleObjectsReturned
            self._key = keys[0]
            if self._key[pkcs11.Attribute.KEY_TYPE] != pkcs11.KeyType.EC:
                msg = f"{self.uri.describe()} is not an EC key; iotauth signs with P-256"
                raise TokenError(msg)
            if self._public is None:
                publics = self._objects(pkcs11.ObjectClass.PUBLIC_KEY)
                if len(publics) != 1:
                    msg = f"{self.uri.describe()} has no public key object beside it"
                    raise TokenError(msg)
                self._public = _ec_point(publics[0][pkcs11.Attribute.EC_POINT], self.uri)

    def _generate(self) -> None:
        import pkcs11
        from pkcs11.util.ec import encode_named_curve_parameters

        attr = pkcs11.Attribute
        with self._module.lock, _token_errors(self.uri, "generating the key"):
            clash = self._objects(pkcs11.ObjectClass.PRIVATE_KEY) + self._objects(
                pkcs11.ObjectClass.PUBLIC_KEY
            )
            if clash:
                msg = (
                    f"PKCS#11 token '{self.uri.token}' already holds a key labelled "
                    f"'{self.uri.object}'; choose another object= (iotauth never reuses or "
                    "overwrites a key)"
                )
                raise TokenError(msg)
            params = self._session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {attr.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            public, private = params.generate_keypair(
                id=self.uri.id if self.uri.id is not None else secrets.token_bytes(16),
                label=self.uri.object,
                store=True,
                capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY,
                public_template={attr.TOKEN: True, attr.VERIFY: True},
                private_template={
                    attr.TOKEN: True,
                    attr.PRIVATE: True,
                    attr.SENSITIVE: True,
                    attr.EXTRACTABLE: False,
                    attr.SIGN: True,
                    attr.DERIVE: False,
                    attr.DECRYPT: False,
                    attr.UNWRAP: False,
                },
            )
            self._created = [private, public]
            self._key = private
            self._public = _ec_point(public[attr.EC_POINT], self.uri)

    # -- Signer ----------------------------------------------------------------------------

    def public_key(self) -> ec.EllipticCurvePublicKey:
        assert self._public is not None  # noqa: S101 - set by open_key / generate_key
        return self._public

    def sign(self, data: bytes) -> bytes:
        import pkcs11

        digest = hashlib.sha256(data).digest()
        with self._module.lock, _token_errors(self.uri, "signing"):
            if self._session is None:
                msg = f"{self.uri.describe()} is closed"
                raise TokenError(msg)
            raw = self._key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def destroy(self) -> None:
        """Delete the key pair this object generated (undoes a failed ``ca init``)."""
        with self._module.lock, _token_errors(self.uri, "deleting the key it just made"):
            for obj in self._created:
                obj.destroy()
            self._created = []

    def close(self) -> None:
        with self._module.lock:
            if self._session is None:
                return
            session, self._session, self._key = self._session, None, None
            with contextlib.suppress(Exception):
                session.close()
            self._logged_out()
        _modules.release(self._path)

    def attributes(self) -> dict[str, Any]:
        """The private key's protection flags as the token reports them (for tests and docs)."""
        import pkcs11

        attr = pkcs11.Attribute
        names = ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "TOKEN")
        with self._module.lock, _token_errors(self.uri, "reading key attributes"):
            return {name: self._key[getattr(attr, name)] for name in names}

    def read_private_value(self) -> bytes:
        """Ask the token for the private scalar (CKA_VALUE): a protected key must refuse."""
        import pkcs11

        with self._module.lock:
            return bytes(self._key[pkcs11.Attribute.VALUE])


def open_key(
    location: str | Pkcs11URI, *, public_key: ec.EllipticCurvePublicKey | None = None
) -> Pkcs11Signer:
    """Open an existing key; with ``public_key`` (the CA certificate's), prove it is that key."""
    uri = location if isinstance(location, Pkcs11URI) else Pkcs11URI.parse(location)
    signer = Pkcs11Signer(uri, public_key=public_key)
    try:
        signer._load()
        if public_key is not None:
            _prove(signer, public_key)
    except BaseException:
        signer.close()
        raise
    return signer


def _prove(signer: Pkcs11Signer, public_key: ec.EllipticCurvePublicKey) -> None:
    """A token signature that the certificate's public key verifies: the pair belongs together."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes

    probe = b"iotauth: does this token key belong to the CA certificate? " + secrets.token_bytes(16)
    try:
        public_key.verify(signer.sign(probe), probe, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        msg = f"{signer.uri.describe()} is not the key of the CA certificate; fix object= or id="
        raise TokenError(msg) from None


def generate_key(location: str | Pkcs11URI) -> Pkcs11Signer:
    """Make a new P-256 key pair in the token (refused if the label is taken)."""
    uri = location if isinstance(location, Pkcs11URI) else Pkcs11URI.parse(location)
    signer = Pkcs11Signer(uri, public_key=None, rw=True)
    try:
        signer._generate()
    except BaseException:
        signer.close()
        raise
    return signer
