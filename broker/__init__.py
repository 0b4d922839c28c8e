"""broker: the hardened amqtt broker (mutual TLS, identity from the certificate, per-identity ACLs).

Not built yet: see the broker security issue. May import ``provisioning`` (identity, CRL, registry).
"""

__all__: list[str] = []
