"""The layout contract of DESIGN.md: who may import whom, and what a device installs."""

from __future__ import annotations

import ast
import re
from importlib.metadata import requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"hardware", "provisioning", "broker", "device_agent", "iotauth"}
ALLOWED = {
    "hardware": set(),
    "provisioning": {"hardware"},
    "broker": {"provisioning"},
    "device_agent": {"hardware", "provisioning"},
    "iotauth": OURS - {"iotauth"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependency_rule(package: str) -> None:
    """Each package imports only the packages DESIGN.md allows it."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in _imports(path):
            top = module.split(".")[0]
            if top in OURS and top != package:
                assert top in ALLOWED[package], f"{path.relative_to(ROOT)} imports {module}"


def test_device_agent_uses_only_identity_from_provisioning() -> None:
    for path in sorted((ROOT / "device_agent").rglob("*.py")):
        for module in _imports(path):
            if module.startswith("provisioning"):
                # provisioning.tls is stdlib-only: the one place every SSLContext is built.
                allowed = {"provisioning.identity", "provisioning.errors", "provisioning.tls"}
                assert module in allowed | {"provisioning"}, (
                    f"{path.relative_to(ROOT)} imports {module}"
                )


def test_agent_extra_pulls_no_broker() -> None:
    """`pip install iotauth[agent]` must not bring amqtt onto a device."""
    reqs = requires("iotauth") or []
    base = [r for r in reqs if "extra ==" not in r]
    agent = [r for r in reqs if re.search(r'extra == "agent"', r)]
    assert agent, reqs
    assert not any(r.lower().startswith("amqtt") for r in base + agent)
    broker = [r for r in reqs if re.search(r'extra == "broker"', r)]
    assert any(re.match(r"amqtt==\d", r) for r in broker), "amqtt must be pinned exactly"


def test_every_module_declares_all() -> None:
    missing = []
    for package in sorted(ALLOWED):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {
                t.id
                for node in tree.body
                if isinstance(node, ast.Assign | ast.AnnAssign)
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            }
            if "__all__" not in names:
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []
