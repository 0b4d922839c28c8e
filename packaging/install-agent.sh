#!/bin/sh
# Install or remove the iotauth device agent on a systemd Linux (Raspberry Pi OS bookworm).
#   sudo packaging/install-agent.sh install [CREDENTIAL_DIR]   # CREDENTIAL_DIR: a provisioned device
#   sudo packaging/install-agent.sh uninstall [--purge]         # --purge also deletes credentials
# The agent goes into a virtualenv at /opt/iotauth with `pip install iotauth[agent]` (no broker,
# no station dependencies); the unit runs its slim entry point /opt/iotauth/bin/iotauth-agent.
# Set IOTAUTH_SOURCE to a wheel or a checkout to install from there.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/iotauth
SOURCE=${IOTAUTH_SOURCE:-iotauth}

need_root() { [ "$(id -u)" -eq 0 ] || { echo "error: run as root (sudo)" >&2; exit 1; }; }

install_agent() {
    need_root
    install -D -m 0644 "$HERE/iotauth.sysusers" /usr/lib/sysusers.d/iotauth.conf
    install -D -m 0644 "$HERE/iotauth.tmpfiles" /usr/lib/tmpfiles.d/iotauth.conf
    systemd-sysusers /usr/lib/sysusers.d/iotauth.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/iotauth.conf
    python3 -m venv "$PREFIX"
    "$PREFIX/bin/pip" install --upgrade "${SOURCE}[agent]"
    # The unit's ExecStart; an older iotauth without the slim entry point would fail at every start.
    [ -x "$PREFIX/bin/iotauth-agent" ] || {
        echo "error: $PREFIX/bin/iotauth-agent is missing (iotauth too old?)" >&2
        exit 1
    }
    [ -f /etc/iotauth/agent.toml ] || install -m 0644 "$HERE/agent.toml" /etc/iotauth/agent.toml
    if [ "${1:-}" != "" ]; then
        for f in device.key device.crt chain.crt ca.crt identity.json; do
            [ -f "$1/$f" ] || { echo "error: $1/$f is missing" >&2; exit 1; }
        done
        cp "$1/device.crt" "$1/chain.crt" "$1/ca.crt" "$1/identity.json" /var/lib/iotauth/
        install -m 0600 "$1/device.key" /var/lib/iotauth/device.key
        chown -R iotauth:iotauth /var/lib/iotauth
        chmod 0700 /var/lib/iotauth
    fi
    install -D -m 0644 "$HERE/iotauth-agent.service" /etc/systemd/system/iotauth-agent.service
    systemctl daemon-reload
    systemctl enable --now iotauth-agent.service
    echo "installed; logs: journalctl -u iotauth-agent -f"
}

uninstall_agent() {
    need_root
    systemctl disable --now iotauth-agent.service 2>/dev/null || true
    rm -f /etc/systemd/system/iotauth-agent.service
    systemctl daemon-reload
    rm -rf "$PREFIX"
    rm -f /usr/lib/tmpfiles.d/iotauth.conf
    if [ "${1:-}" = "--purge" ]; then
        rm -rf /var/lib/iotauth /etc/iotauth
        rm -f /usr/lib/sysusers.d/iotauth.conf
        userdel iotauth 2>/dev/null || true
    fi
    echo "removed${1:+ ($1)}"
}

case "${1:-}" in
    install) shift; install_agent "${1:-}" ;;
    uninstall) shift; uninstall_agent "${1:-}" ;;
    *) echo "usage: $0 install [CREDENTIAL_DIR] | uninstall [--purge]" >&2; exit 2 ;;
esac
