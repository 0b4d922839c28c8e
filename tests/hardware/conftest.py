"""Fixtures for the hardware tests (helpers live in hw_helpers.py)."""

from __future__ import annotations

import pytest

from hardware.keygen import CryptographyBackend, NoKeygenBackend
from hardware.responder import Responder
from hardware.store import CredentialStore
from tests.hardware.hw_helpers import MiniCA, new_ca


@pytest.fixture(scope="session")
def mini_ca() -> MiniCA:
    return new_ca()


@pytest.fixture
def make_responder(tmp_path):
    """``make_responder(can_genkey=True, subdir="dev")`` -> a Responder on a store in tmp_path."""

    def make(*, can_genkey: bool = True, subdir: str = "dev", serial: str = "HW-0001") -> Responder:
        backend = CryptographyBackend() if can_genkey else NoKeygenBackend()
        store = CredentialStore(tmp_path / subdir)
        return Responder(store, hardware_serial=serial, backend=backend)

    return make
