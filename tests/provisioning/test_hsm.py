"""The issuing CA key in a PKCS#11 token: a real SoftHSM2 token per test, openssl as the judge.

Everything here also holds for any other token: iotauth has no SoftHSM-specific code path, the
token is reached through its PKCS#11 module only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioning import hsm
from provisioning.config import PKIConfig
from provisioning.errors import PKIError, TokenError
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from tests.conftest import (
    Result,
    SoftHSM,
    assert_one_line_error,
    needs_softhsm,
    openssl,
    openssl_verify,
)

# -- the URI (RFC 7512) ------------------------------------------------------------------------


def test_uri_canonical_form_round_trips() -> None:
    uri = hsm.Pkcs11URI.parse(
        "pkcs11:token=My%20CA;object=issuing;id=%01%ff?module-path=/opt/hsm/lib%20x.so"
    )
    assert (uri.token, uri.object, uri.id) == ("My CA", "issuing", b"\x01\xff")
    assert uri.module_path == "/opt/hsm/lib x.so"
    assert (
        str(uri) == "pkcs11:token=My%20CA;object=issuing;id=%01%ff?module-path=/opt/hsm/lib%20x.so"
    )
    assert hsm.Pkcs11URI.parse(str(uri)) == uri
    # A label with TOML-hostile characters is percent-encoded, so pki.toml stays valid.
    odd = hsm.Pkcs11URI(token='a"b\\c', object="x;y")
    assert '"' not in str(odd)
    assert "\\" not in str(odd)
    assert hsm.Pkcs11URI.parse(str(odd)) == odd


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("token=a;object=b", "is not a PKCS#11 URI"),
        ("pkcs11:object=b", "needs token="),
        ("pkcs11:token=a", "needs object="),
        ("pkcs11:token=a;object=b?pin-value=1234", "give the PIN in IOTAUTH_PKCS11_PIN only"),
        ("pkcs11:token=a;object=b?pin-source=file:/p", "give the PIN in IOTAUTH_PKCS11_PIN only"),
        ("pkcs11:token=a;object=b;module-path=/x.so", "module-path is a query attribute"),
        ("pkcs11:token=a;object=b;model=x", "is not supported"),
        ("pkcs11:token=a;object=b;type=public", "type= may only be 'private'"),
        ("pkcs11:token=a;token=c;object=b", "gives token= twice"),
        ("pkcs11:token=%ff;object=b", "not UTF-8"),
    ],
)
def test_bad_uris_are_refused_with_the_fix(text: str, fragment: str) -> None:
    with pytest.raises(PKIError, match=None) as caught:
        hsm.Pkcs11URI.parse(text)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_pki_toml_refuses_a_bad_key_location(tmp_path: Path) -> None:
    path = tmp_path / "pki.toml"
    path.write_text('[pki]\nversion = 1\ntrust_domain = "f.example"\nissuing_key = "/x.pem"\n')
    with pytest.raises(PKIError, match=r"pki.toml: issuing_key: .* is not a PKCS#11 URI"):
        PKIConfig.load(path)


# -- a PKI whose issuing key is in the token, through the real CLI -----------------------------


def _env(softhsm: SoftHSM, **changes: str | None) -> dict[str, str]:
    """The token's environment with some variables replaced (a value) or removed (None)."""
    env = dict(softhsm.env)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# The environment of a station whose operator got the PIN or the module wrong.
_BROKEN_ENV: dict[str, dict[str, str | None]] = {
    "wrong-pin": {"IOTAUTH_PKCS11_PIN": "0000-wrong"},
    "no-pin": {"IOTAUTH_PKCS11_PIN": None},
    "no-module": {"IOTAUTH_PKCS11_MODULE": None},
}


def _init(cli: Callable[..., Result], softhsm: SoftHSM, pki: Path, *extra: str) -> Result:
    return cli(
        "ca", "init", "--pki", str(pki), "--trust-domain", "fleet.example",
        "--issuing-key", softhsm.uri("issuing"), *extra,
        env=softhsm.env,
    )  # fmt: skip


@needs_softhsm
def test_token_held_issuing_ca_end_to_end(
    cli: Callable[..., Result], softhsm: SoftHSM, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    env = softhsm.env
    result = _init(cli, softhsm, pki)
    assert result.returncode == 0, result.stderr
    assert "issuing key pkcs11:token=iotauth-ca;object=issuing (in the token" in result.stdout
    assert sorted(p.name for p in (pki / "private").iterdir()) == ["root.key", "server.key"]
    assert (
        'issuing_key = "pkcs11:token=iotauth-ca;object=issuing"' in (pki / "pki.toml").read_text()
    )
    assert softhsm.objects() == ["issuing", "issuing"]  # the private key and its public half

    cli("device", "issue", "dev-1", "--pki", str(pki), "--out", "dev-1", env=env, check=True)
    cli("device", "issue", "dev-2", "--pki", str(pki), "--out", "dev-2", env=env, check=True)
    cli("service", "issue", "sink", "--pki", str(pki), "--out", "sink", env=env, check=True)
    for cert in (tmp_path / "dev-1/device.crt", tmp_path / "sink/device.crt"):
        assert openssl_verify(pki, cert, crl=True).returncode == 0
    server = openssl_verify(pki, pki / "server.crt", purpose="sslserver")
    assert server.returncode == 0, server.stdout + server.stderr

    cli("device", "revoke", "dev-1", "--pki", str(pki), env=env, check=True)
    cli("ca", "crl", "--pki", str(pki), env=env, check=True)
    crl = openssl(
        "crl", "-in", pki / "crl.pem", "-CAfile", pki / "issuing.crt", "-noout", "-verify"
    )
    assert crl.returncode == 0
    assert "verify OK" in crl.stderr + crl.stdout
    revoked = openssl_verify(pki, tmp_path / "dev-1/device.crt", crl=True)
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
    assert openssl_verify(pki, tmp_path / "dev-2/device.crt", crl=True).returncode == 0

    report = cli("ledger", "verify", "--pki", str(pki), env=env, check=True)
    # Each ledger line was signed in the token: its signature verifies with issuing.crt.
    assert "ledger OK: 5 entries" in report.stdout
    lines = [json.loads(line) for line in (pki / "ledger.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines] == ["ca-init", "issue", "issue", "issue", "revoke"]
    assert not (pki / "private" / "issuing.key").exists()
    show = json.loads(cli("ca", "show", "--pki", str(pki), "--json", check=True).stdout)
    assert show["issuing_key"] == softhsm.uri("issuing")


@needs_softhsm
def test_ledger_verify_needs_no_pin(
    cli: Callable[..., Result], softhsm: SoftHSM, tmp_path: Path
) -> None:
    """Reading and verifying use the public key only: the token is for signing."""
    pki = tmp_path / "pki"
    assert _init(cli, softhsm, pki).returncode == 0
    env = _env(softhsm, IOTAUTH_PKCS11_PIN=None)
    cli("ledger", "verify", "--pki", str(pki), env=env, check=True)
    cli("device", "list", "--pki", str(pki), env=env, check=True)


@needs_softhsm
def test_root_in_a_token_too(cli: Callable[..., Result], softhsm: SoftHSM, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    result = _init(cli, softhsm, pki, "--root-key", softhsm.uri("root"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (pki / "private").iterdir()) == ["server.key"]
    text = (pki / "pki.toml").read_text()
    assert 'root_key = "pkcs11:token=iotauth-ca;object=root"' in text
    assert "Move" not in result.stdout  # no root.key to move offline
    show = cli("ca", "show", "--pki", str(pki), check=True).stdout
    assert "key pkcs11:token=iotauth-ca;object=root" in show
    assert "key pkcs11:token=iotauth-ca;object=issuing" in show
    check = openssl("verify", "-CAfile", pki / "root.crt", pki / "root.crt")
    assert check.returncode == 0, check.stdout
    assert openssl_verify(pki, pki / "server.crt", purpose="sslserver").returncode == 0
    cli("device", "issue", "dev-1", "--pki", str(pki), "--out", "d", env=softhsm.env, check=True)
    assert openssl_verify(pki, tmp_path / "d/device.crt", crl=True).returncode == 0


@needs_softhsm
def test_the_key_cannot_leave_the_token(softhsm: SoftHSM, tmp_path: Path) -> None:
    import pkcs11

    with PKI.init(tmp_path / "pki", trust_domain="f.example", issuing_key=softhsm.uri()) as ca:
        signer = ca.issuing_key()
        assert isinstance(signer, hsm.Pkcs11Signer)
        assert signer.attributes() == {
            "SENSITIVE": True,
            "EXTRACTABLE": False,
            "ALWAYS_SENSITIVE": True,
            "NEVER_EXTRACTABLE": True,
            "TOKEN": True,
        }
        with pytest.raises(pkcs11.AttributeSensitive):
            signer.read_private_value()
        # Negative twin: the same request against a key that is allowed out does return it, so
        # the refusal above is the token's policy at work, not a request that can never succeed.
        with signer._module.lock:
            session = signer._session
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {
                    pkcs11.Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters(
                        "secp256r1"
                    )
                },
                local=True,
            )
            _, loose = params.generate_keypair(
                store=False,
                private_template={
                    pkcs11.Attribute.SENSITIVE: False,
                    pkcs11.Attribute.EXTRACTABLE: True,
                },
            )
            assert len(loose[pkcs11.Attribute.VALUE]) == 32


@needs_softhsm
def test_in_process_issuance_and_crl_verify(softhsm: SoftHSM, tmp_path: Path) -> None:
    with PKI.init(tmp_path / "pki", trust_domain="f.example", issuing_key=softhsm.uri()) as ca:
        issued = ca.issue_many([f"d-{n}" for n in range(5)])
        issued.append(ca.issue("svc", kind=IdentityKind.SERVICE))
        for item in issued:
            item.certificate.verify_directly_issued_by(ca.issuing)
        ca.revoke("d-0")
        assert ca.crl_info().revoked == 1
        assert ca.verify_ledger().entries == 8
    # After close, a new PKI object opens the token again (the module was finalized).
    with PKI.open(tmp_path / "pki") as again:
        again.issue("d-9")
        again.verify_ledger()


# -- failures: one line, nothing written --------------------------------------------------------


@needs_softhsm
@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("wrong-pin", ["token 'iotauth-ca' refused the PIN", "IOTAUTH_PKCS11_PIN is wrong"]),
        ("no-pin", ["set IOTAUTH_PKCS11_PIN", "'iotauth-ca'"]),
        ("missing-token", ["no PKCS#11 token labelled 'nope'", "iotauth-ca", "fix token="]),
        ("no-module", ["no PKCS#11 module", "IOTAUTH_PKCS11_MODULE"]),
        ("bad-module", ["cannot load PKCS#11 module /nonexistent/lib.so", "module-path"]),
        ("not-a-module", ["cannot load PKCS#11 module", "fix ?module-path="]),
        ("pin-in-uri", ["give the PIN in IOTAUTH_PKCS11_PIN only"]),
    ],
)
def test_ca_init_errors_write_nothing(
    cli: Callable[..., Result],
    softhsm: SoftHSM,
    tmp_path: Path,
    case: str,
    fragments: list[str],
) -> None:
    uri = softhsm.uri("issuing")
    env = _env(softhsm, **_BROKEN_ENV.get(case, {}))
    if case == "missing-token":
        uri = softhsm.uri("issuing", token="nope")
    elif case == "bad-module":
        uri += "?module-path=/nonexistent/lib.so"
    elif case == "not-a-module":
        (tmp_path / "fake.so").write_bytes(b"not a shared object")
        uri += f"?module-path={tmp_path / 'fake.so'}"
    elif case == "pin-in-uri":
        uri += "?pin-value=4321-user"
    pki = tmp_path / "pki"
    result = cli(
        "ca", "init", "--pki", str(pki), "--trust-domain", "f.example", "--issuing-key", uri,
        env=env,
    )  # fmt: skip
    assert_one_line_error(result, *fragments)
    assert not pki.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pki")] == []
    assert softhsm.objects() == []


@needs_softhsm
def test_ca_init_refuses_a_taken_label_and_removes_what_it_made(
    cli: Callable[..., Result], softhsm: SoftHSM, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    assert _init(cli, softhsm, first).returncode == 0
    before = softhsm.objects()
    # The root is made in the token first; the issuing label is taken, so init fails and the
    # root key it already made is deleted again.
    second = tmp_path / "second"
    result = _init(cli, softhsm, second, "--root-key", softhsm.uri("root"))
    assert_one_line_error(
        result, "already holds a key labelled 'issuing'", "choose another object="
    )
    assert not second.exists()
    assert softhsm.objects() == before
    same = cli(
        "ca", "init", "--pki", str(second), "--trust-domain", "f.example",
        "--issuing-key", softhsm.uri("x"), "--root-key", softhsm.uri("x"), env=softhsm.env,
    )  # fmt: skip
    assert_one_line_error(same, "need different object= names")


def _set_issuing_key(pki: Path, uri: str) -> None:
    toml = pki / "pki.toml"
    lines = [ln for ln in toml.read_text().splitlines() if not ln.startswith("issuing_key")]
    toml.write_text("\n".join([*lines, f'issuing_key = "{uri}"']) + "\n")


@needs_softhsm
@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("wrong-pin", ["refused the PIN", "IOTAUTH_PKCS11_PIN is wrong"]),
        ("missing-object", ["has no private key labelled 'gone'", "fix object="]),
        ("missing-token", ["no PKCS#11 token labelled 'elsewhere'", "fix token="]),
        ("foreign-key", ["key 'root' in PKCS#11 token 'iotauth-ca' is not the key of the CA"]),
        ("no-pin", ["set IOTAUTH_PKCS11_PIN"]),
    ],
)
def test_signing_errors_change_nothing(
    cli: Callable[..., Result],
    softhsm: SoftHSM,
    tmp_path: Path,
    case: str,
    fragments: list[str],
) -> None:
    pki = tmp_path / "pki"
    assert _init(cli, softhsm, pki, "--root-key", softhsm.uri("root")).returncode == 0
    cli("device", "issue", "dev-0", "--pki", str(pki), "--out", "d0", env=softhsm.env, check=True)
    env = _env(softhsm, **_BROKEN_ENV.get(case, {}))
    if case == "missing-object":
        _set_issuing_key(pki, softhsm.uri("gone"))
    elif case == "missing-token":
        _set_issuing_key(pki, softhsm.uri("issuing", token="elsewhere"))
    elif case == "foreign-key":
        _set_issuing_key(pki, softhsm.uri("root"))  # a real key in the token, the wrong one
    state = {p.name: p.read_bytes() for p in pki.iterdir() if p.is_file() and p.name != "pki.toml"}
    for args in (
        ["device", "issue", "dev-1", "--out", "dev-1"],
        ["device", "revoke", "dev-0"],
        ["ca", "crl"],
    ):
        result = cli(*args, "--pki", str(pki), env=env)
        assert_one_line_error(result, *fragments)
    assert not (tmp_path / "dev-1").exists()
    after = {p.name: p.read_bytes() for p in pki.iterdir() if p.is_file() and p.name != "pki.toml"}
    assert after.keys() == state.keys()
    for name in ("ledger.jsonl", "crl.pem"):
        assert after[name] == state[name], name


@needs_softhsm
def test_open_key_errors_are_token_errors(softhsm: SoftHSM) -> None:
    with pytest.raises(TokenError, match="has no private key labelled 'nothing'"):
        hsm.open_key(softhsm.uri("nothing"))
    signer = hsm.generate_key(softhsm.uri("k"))
    signer.close()
    with pytest.raises(TokenError, match="is closed"):
        signer.sign(b"x")


def test_no_softhsm_specific_code() -> None:
    """The product reaches tokens through their PKCS#11 module only: no SoftHSM path or setting
    in the code, so what passes here with SoftHSM2 runs the same code with any token."""
    root = Path(__file__).resolve().parents[2]
    for package in ("provisioning", "broker", "iotauth", "device_agent", "hardware"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for needle in ("libsofthsm2", "SOFTHSM2_CONF", "softhsm2-util"):
                assert needle not in text, f"{path.relative_to(root)} names {needle}"


# -- losing the token: a new issuing CA under the same (offline) root ----------------------------


@needs_softhsm
def test_reissue_the_issuing_ca_from_the_offline_root(
    cli: Callable[..., Result], softhsm: SoftHSM, tmp_path: Path
) -> None:
    """The issuing key's token is gone; the root key was kept offline. A new PKI keeps the root
    (devices' ca.crt stays valid) and gets a new issuing CA in a replacement token."""
    old = tmp_path / "old"
    assert _init(cli, softhsm, old).returncode == 0
    cli("device", "issue", "dev-1", "--pki", str(old), "--out", "d1", env=softhsm.env, check=True)
    offline = tmp_path / "offline-root.key"
    (old / "private" / "root.key").rename(offline)
    softhsm.init_token("replacement")
    new = tmp_path / "new"
    result = cli(
        "ca", "init", "--pki", str(new), "--trust-domain", "fleet.example",
        "--root-cert", str(old / "root.crt"), "--root-key", str(offline),
        "--issuing-key", softhsm.uri("issuing", token="replacement"),
        env=softhsm.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "root kept from" in result.stdout
    assert (new / "root.crt").read_bytes() == (old / "root.crt").read_bytes()
    assert sorted(p.name for p in (new / "private").iterdir()) == ["server.key"]
    assert (new / "issuing.crt").read_bytes() != (old / "issuing.crt").read_bytes()
    cli("device", "issue", "dev-9", "--pki", str(new), "--out", "d9", env=softhsm.env, check=True)
    # A device provisioned under the old issuing CA still trusts the new broker certificate and
    # the new devices (its ca.crt is the same root).
    for cert, purpose in (
        (new / "server.crt", "sslserver"),
        (tmp_path / "d9/device.crt", "sslclient"),
    ):
        check = openssl(
            "verify", "-purpose", purpose, "-CAfile", old / "root.crt",
            "-untrusted", new / "issuing.crt", cert,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
    # A device of the lost issuing CA has no CRL in the new PKI: refused until it is re-issued.
    stranded = openssl(
        "verify", "-crl_check", "-CRLfile", new / "crl.pem", "-CAfile", old / "root.crt",
        "-untrusted", old / "issuing.crt", tmp_path / "d1/device.crt",
    )  # fmt: skip
    assert stranded.returncode != 0
    assert "unable to get certificate CRL" in stranded.stdout + stranded.stderr
    cli("ledger", "verify", "--pki", str(new), env=softhsm.env, check=True)
    first = json.loads((new / "ledger.jsonl").read_text().splitlines()[0])
    assert first["data"]["root_reused"] is True


@needs_softhsm
@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("foreign-root-key", ["is not the key of", "root.crt"]),
        ("no-root-key", ["--root-cert needs --root-key"]),
        ("other-domain", ["is not the root of other.example"]),
        ("not-a-cert", ["is not a PEM certificate"]),
    ],
)
def test_reissue_refuses_a_wrong_root(
    cli: Callable[..., Result], softhsm: SoftHSM, tmp_path: Path, case: str, fragments: list[str]
) -> None:
    old = tmp_path / "old"
    assert _init(cli, softhsm, old).returncode == 0
    other = tmp_path / "other"
    cli("ca", "init", "--pki", str(other), "--trust-domain", "fleet.example", check=True)
    root_cert, root_key = old / "root.crt", other / "private" / "root.key"  # foreign key
    domain = "fleet.example"
    args: list[str] = []
    if case == "no-root-key":
        args = ["--root-cert", str(root_cert)]
    else:
        if case != "foreign-root-key":
            root_key = old / "private" / "root.key"
        if case == "other-domain":
            domain = "other.example"
        if case == "not-a-cert":
            root_cert = old / "pki.toml"
        args = ["--root-cert", str(root_cert), "--root-key", str(root_key)]
    new = tmp_path / "new"
    result = cli(
        "ca", "init", "--pki", str(new), "--trust-domain", domain,
        "--issuing-key", softhsm.uri("issuing-2"), *args, env=softhsm.env,
    )  # fmt: skip
    assert_one_line_error(result, *fragments)
    assert not new.exists()
    assert softhsm.objects() == ["issuing", "issuing"]  # nothing new in the token


@needs_softhsm
def test_reissue_with_the_root_in_the_token(
    cli: Callable[..., Result], softhsm: SoftHSM, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    assert _init(cli, softhsm, old, "--root-key", softhsm.uri("root")).returncode == 0
    new = tmp_path / "new"
    result = cli(
        "ca", "init", "--pki", str(new), "--trust-domain", "fleet.example",
        "--root-cert", str(old / "root.crt"), "--root-key", softhsm.uri("root"),
        "--issuing-key", softhsm.uri("issuing-2"), env=softhsm.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert 'root_key = "pkcs11:token=iotauth-ca;object=root"' in (new / "pki.toml").read_text()
    assert openssl_verify(new, new / "server.crt", purpose="sslserver").returncode == 0
    # The kept root key is still in the token: init did not delete or replace it.
    assert softhsm.objects().count("root") == 2


def test_without_the_hsm_extra_the_reason_is_one_line(tmp_path: Path) -> None:
    """A station installed without `iotauth[hsm]`: the token is refused with the fix, and a PKI
    with file keys does not need the extra at all."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['pkcs11'] = None\n"  # python-pkcs11 not installed
        "from iotauth.cli import main\n"
        "sys.argv = ['iotauth', *sys.argv[1:]]\n"
        "main()\n"
    )

    def run(*args: str) -> Result:
        proc = subprocess.run(
            [sys.executable, "-c", script, *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "IOTAUTH_PKCS11_MODULE": "/nonexistent.so"},
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    result = run("ca", "init", "--pki", "pki", "--trust-domain", "f.example",
                 "--issuing-key", "pkcs11:token=t;object=o")  # fmt: skip
    assert_one_line_error(result, "needs python-pkcs11", "pip install 'iotauth[hsm]'")
    assert not (tmp_path / "pki").exists()
    assert run("ca", "init", "--pki", "pki", "--trust-domain", "f.example").returncode == 0


@needs_softhsm
def test_keys_iotauth_cannot_use_are_refused(softhsm: SoftHSM) -> None:
    """An object= that names an RSA or a P-384 key: one line, not a wrong signature later."""
    import pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters

    maker = hsm.generate_key(softhsm.uri("maker"))
    try:
        with maker._module.lock:
            session = maker._session
            session.generate_keypair(pkcs11.KeyType.RSA, 2048, label="rsa", store=True)
            p384 = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")},
                local=True,
            )
            p384.generate_keypair(label="p384", store=True)
    finally:
        maker.close()
    with pytest.raises(TokenError, match=r"'rsa' .* is not an EC key"):
        hsm.open_key(softhsm.uri("rsa"))
    with pytest.raises(TokenError, match=r"'p384' .* is not a P-256 key"):
        hsm.open_key(softhsm.uri("p384"))


def test_a_device_install_does_not_pull_the_pkcs11_binding() -> None:
    from importlib.metadata import requires

    reqs = [r for r in requires("iotauth") or [] if r.lower().startswith(("python-pkcs11", "asn1"))]
    assert len(reqs) == 2, reqs
    assert all('extra == "hsm"' in r for r in reqs), reqs


@needs_softhsm
def test_gang_provisioning_signs_in_the_token(softhsm: SoftHSM, tmp_path: Path) -> None:
    """Bench provisioning over ptys, four ports at once: each station thread opens the PKI and
    signs in the token (one module, calls serialized, one login shared by the sessions)."""
    from hardware import VirtualDevice
    from provisioning.station import StationSettings, provision_many

    pki_dir = tmp_path / "pki"
    PKI.init(pki_dir, trust_domain="fleet.example", issuing_key=softhsm.uri()).close()
    devices = [
        VirtualDevice(tmp_path / "stores" / f"u{n}", "pty", hardware_serial=f"SN-{n}").start()
        for n in range(4)
    ]
    try:
        settings = StationSettings(timeout=0.15, retries=8, reconnects=3, reconnect_delay=0.2)
        results = provision_many(pki_dir, [d.address for d in devices], settings=settings)
    finally:
        for device in devices:
            device.stop()
    assert [r.ok for r in results] == [True] * 4, [r.reason for r in results]
    for n in range(4):
        store = tmp_path / "stores" / f"u{n}"
        assert openssl_verify(pki_dir, store / "device.crt").returncode == 0
    with PKI.open(pki_dir) as ca:
        assert ca.registry.count() == 4
        ca.verify_ledger()
