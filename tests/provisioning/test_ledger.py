"""The ledger: every kind of tampering is detected and the first bad line is named."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.errors import LedgerCorruptError, PKIError
from provisioning.pki import PKI


@pytest.fixture
def busy_pki(pki: PKI) -> PKI:
    """ca-init, four issues and a revocation: six lines."""
    for n in range(4):
        pki.issue(f"dev-{n}")
    pki.revoke("dev-1", reason="key-compromise")
    assert pki.verify_ledger().entries == 6
    return pki


def _lines(pki: PKI) -> list[bytes]:
    return pki.ledger.path.read_bytes().splitlines(keepends=True)


def _write(pki: PKI, lines: list[bytes]) -> None:
    pki.ledger.path.write_bytes(b"".join(lines))


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _rehash(obj: dict[str, object]) -> dict[str, object]:
    body = {k: obj[k] for k in ("seq", "time", "event", "data", "prev")}
    obj["hash"] = hashlib.sha256(_canonical(body)).hexdigest()
    return obj


def _edit(lines: list[bytes]) -> list[bytes]:
    entry = json.loads(lines[2])
    entry["data"]["name"] = "dev-evil"
    lines[2] = _canonical(entry) + b"\n"
    return lines


def _edit_and_rehash(lines: list[bytes]) -> list[bytes]:
    entry = _rehash({**json.loads(lines[2]), "event": "issue-edited"})
    lines[2] = _canonical(entry) + b"\n"
    return lines


def _delete(lines: list[bytes]) -> list[bytes]:
    del lines[2]
    return lines


def _insert_copy(lines: list[bytes]) -> list[bytes]:
    lines.insert(3, lines[2])
    return lines


def _reorder(lines: list[bytes]) -> list[bytes]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def _cut_tail(lines: list[bytes]) -> list[bytes]:
    return lines[:-1]


def _partial_line(lines: list[bytes]) -> list[bytes]:
    lines[-1] = lines[-1][:40]
    return lines


def _forge_whole_chain(lines: list[bytes]) -> list[bytes]:
    """An attacker without the CA key rebuilds every hash and signs with a key of their own."""
    key = ec.generate_private_key(ec.SECP256R1())
    prev = "0" * 64
    out = []
    for raw in lines:
        entry = json.loads(raw)
        entry["prev"] = prev
        if entry["event"] == "issue":
            entry["data"]["name"] = "forged"
        entry = _rehash(entry)
        sig = key.sign(bytes.fromhex(str(entry["hash"])), ec.ECDSA(hashes.SHA256()))
        entry["sig"] = base64.b64encode(sig).decode()
        prev = str(entry["hash"])
        out.append(_canonical(entry) + b"\n")
    return out


CASES: list[tuple[Callable[[list[bytes]], list[bytes]], int, str]] = [
    (_edit, 3, "entry edited"),
    (_edit_and_rehash, 3, "signature"),
    (_delete, 3, "a line is missing"),
    (_insert_copy, 4, "out of order"),
    (_reorder, 3, "sequence number 4 where 3"),
    (_cut_tail, 6, "cut from the end"),
    (_partial_line, 6, "incomplete last line"),
    (_forge_whole_chain, 1, "signature"),
]


@pytest.mark.parametrize(
    ("tamper", "line", "reason"), CASES, ids=[c[0].__name__.strip("_") for c in CASES]
)
def test_tampering_is_detected_at_the_first_bad_line(
    busy_pki: PKI, tamper: Callable[[list[bytes]], list[bytes]], line: int, reason: str
) -> None:
    _write(busy_pki, tamper(_lines(busy_pki)))
    with pytest.raises(LedgerCorruptError) as info:
        busy_pki.verify_ledger()
    assert info.value.line == line
    assert reason in str(info.value)


def test_untouched_ledger_verifies(busy_pki: PKI) -> None:
    report = busy_pki.verify_ledger()
    assert report.entries == 6
    assert [e.event for _, e in busy_pki.ledger.entries()] == [
        "ca-init", "issue", "issue", "issue", "issue", "revoke",
    ]  # fmt: skip


def test_registry_rows_missing_from_the_ledger_are_reported(busy_pki: PKI) -> None:
    """Cutting the ledger and the registry's head together still leaves the rows as witnesses."""
    first = json.loads(_lines(busy_pki)[0])
    _write(busy_pki, _lines(busy_pki)[:1])
    with busy_pki.registry.transaction():
        busy_pki.registry.set_meta("ledger_seq", "1")
        busy_pki.registry.set_meta("ledger_hash", first["hash"])
    with pytest.raises(PKIError, match="4 certificate\\(s\\) the ledger never recorded"):
        busy_pki.verify_ledger()


def test_a_failed_change_takes_its_ledger_lines_back(pki: PKI, pki_dir: Path) -> None:
    """Lines appended inside a transaction that then fails are cut off, so the chain never forks."""
    pki.issue("dev-1")
    size = (pki_dir / "ledger.jsonl").stat().st_size

    def fail() -> None:
        assert (pki_dir / "ledger.jsonl").stat().st_size > size  # the line was written...
        raise RuntimeError

    def change_that_fails() -> None:
        def body(change: Any) -> None:
            change.events.append(("note", {"x": 1}))
            change.on_commit.append(fail)

        pki._write(pki.crl_info().this_update, body)

    with pytest.raises(RuntimeError):
        change_that_fails()
    assert (pki_dir / "ledger.jsonl").stat().st_size == size  # ...and taken back
    pki.issue("dev-2")
    assert pki.verify_ledger().entries == 3


def test_the_hash_built_at_append_is_the_one_the_verifier_recomputes(pki: PKI) -> None:
    """build_entries assembles the canonical line around the data it already encoded; every
    awkward character must come out as json.dumps(sort_keys=True) would make it."""
    from provisioning.ledger import GENESIS, LedgerHead, build_entries, verify_chain

    odd = {
        'quote"key': 'va"lue\\ \n\t',
        "unicode": "Zürich ✓ \u2028",
        "nested": {"b": [1, 2.5, None, True], "a": {"z": "", "y": "\x00"}},
        "number": -7,
    }
    entries = build_entries(
        LedgerHead(0, GENESIS),
        [("issue", odd), ('ev"ent ü', {}), ("x", {"k": ["é"]})],
        signer=pki.issuing_key(),
    )
    public = pki.issuing.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert verify_chain(((e.seq, e) for e in entries), key_for=lambda _: public) == entries
