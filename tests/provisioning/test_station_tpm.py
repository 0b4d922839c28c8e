"""The station and a TPM-backed device through the real command lines (`iotauth hw emulate
--keystore tpm --tpm TCTI`, `iotauth provision`): the key is made in the swtpm, the station
records the key store, and a station-made key is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hardware.tpm import is_tpm_blob
from provisioning.pki import PKI
from tests.conftest import CLI, SoftTpm, needs_swtpm, openssl_verify

pytestmark = needs_swtpm


def test_cli_provisions_a_tpm_device_and_refuses_station_keys(
    swtpm: SoftTpm, pki_dir: Path, pki: PKI, tmp_path: Path
) -> None:
    """`iotauth hw emulate --keystore tpm --tpm TCTI` and `iotauth provision`: the user's view."""
    store = tmp_path / "dev"
    proc = subprocess.Popen(
        [*CLI, "hw", "emulate", "--store", str(store), "--link", "socket://127.0.0.1:0",
         "--keystore", "tpm", "--tpm", swtpm.tcti],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"keys made in the TPM at {swtpm.tcti}" in banner
        address = next(
            line.split(": ", 1)[1].strip()
            for line in proc.stdout
            if line.startswith("station port: ")
        )
        refused = subprocess.run(
            [*CLI, "provision", "--pki", str(pki_dir), "--port", address, "--keygen", "station"],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "keeps its key in a TPM and takes no injected key" in refused.stderr
        assert "Traceback" not in refused.stderr
        done = subprocess.run(
            [*CLI, "provision", "--pki", str(pki_dir), "--port", address],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    assert json.loads((store / "identity.json").read_text())["keystore"] == "tpm"
    assert is_tpm_blob((store / "device.key").read_bytes())
    assert openssl_verify(pki_dir, store / "device.crt").returncode == 0
