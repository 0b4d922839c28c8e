"""The serial provisioning protocol: codec, device responder, credential store, station client.

Device side (portable, no serial or socket imports): ``codec``, ``messages``, ``responder``,
``store``, ``keygen``; ``tpm`` (CPython on Linux only, loaded only for a TPM key store) makes and
uses keys inside a TPM 2.0. Station side: ``client``. Test and bench plumbing: ``transport``,
``emulator``. See docs/SERIAL_PROTOCOL.md.

Under MicroPython (``hardware.mp_device``) only the device side is imported: the station side
needs pyserial, threads and sockets, which a device never has.
"""

from hardware._compat import MICROPYTHON
from hardware.codec import (
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Command,
    DeviceState,
    Frame,
    FrameDecoder,
    ObjectKind,
    Status,
    encode_frame,
)
from hardware.errors import (
    DeviceGoneError,
    DeviceRefusedError,
    HardwareError,
    IntegrityError,
    InvalidDeviceIdError,
    PortError,
    ProtocolViolationError,
    StoreError,
)
from hardware.keygen import CryptographyBackend, KeyBackend, NoKeygenBackend
from hardware.messages import HelloInfo
from hardware.responder import Responder
from hardware.store import CredentialStore

if not MICROPYTHON:
    from hardware.client import ClientCore, DeviceClient, PutResult, open_port
    from hardware.emulator import FaultConfig, VirtualDevice, run_emulator

__all__ = [
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "ClientCore",
    "Command",
    "CredentialStore",
    "CryptographyBackend",
    "DeviceClient",
    "DeviceGoneError",
    "DeviceRefusedError",
    "DeviceState",
    "FaultConfig",
    "Frame",
    "FrameDecoder",
    "HardwareError",
    "HelloInfo",
    "IntegrityError",
    "InvalidDeviceIdError",
    "KeyBackend",
    "NoKeygenBackend",
    "ObjectKind",
    "PortError",
    "ProtocolViolationError",
    "PutResult",
    "Responder",
    "Status",
    "StoreError",
    "VirtualDevice",
    "encode_frame",
    "open_port",
    "run_emulator",
]
