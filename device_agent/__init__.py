"""device_agent: what runs on a device (MQTT over mutual TLS, telemetry, commands, renewal).

Not built yet: see the device agent issue. May import ``hardware`` (store) and
``provisioning.identity`` only, so that ``pip install iotauth[agent]`` pulls no broker code.
"""

__all__: list[str] = []
