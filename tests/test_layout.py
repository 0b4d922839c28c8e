"""The layout contract of docs/ARCHITECTURE.md: who may import whom, and what a device installs."""

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
    """Each package imports only the packages docs/ARCHITECTURE.md allows it."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in _imports(path):
            top = module.split(".")[0]
            if top in OURS and top != package:
                assert top in ALLOWED[package], f"{path.relative_to(ROOT)} imports {module}"


# What device_agent may use of provisioning: the identity, and the one module that builds every
# SSLContext (tls), the one that writes key files (keyfiles) and the renewal protocol's messages
# (renewal_protocol, shared with the broker's renewal service), and the device-token contract
# (tokens, shared with the broker's jwt method; the agent signs in a child process, see
# device_agent/token.py). All stdlib-only at import time.
AGENT_PROVISIONING = (
    "__init__",
    "errors",
    "identity",
    "tls",
    "keyfiles",
    "renewal_protocol",
    "tokens",
)


def test_device_agent_uses_only_identity_from_provisioning() -> None:
    allowed = {f"provisioning.{name}" for name in AGENT_PROVISIONING} | {"provisioning"}
    for path in sorted((ROOT / "device_agent").rglob("*.py")):
        for module in _imports(path):
            if module.startswith("provisioning"):
                assert module in allowed, f"{path.relative_to(ROOT)} imports {module}"


def _module_level_imports(path: Path) -> set[str]:
    """Imports that run when the module is imported: not inside functions or TYPE_CHECKING."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    visit(block)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body)
    return found


# What a running device agent must not load at import time (bench/notes/agent_footprint.md):
# cryptography brings its own OpenSSL (~8 MB RSS; only a renewal needs it, imported there), and
# typer/rich (~9 MB) belong to `iotauth agent run`, not to the slim `iotauth-agent run`.
AGENT_LAZY = {"cryptography": set(), "typer": {"cli.py"}, "rich": set(), "click": set()}


def test_device_agent_defers_heavy_imports() -> None:
    # The provisioning modules device_agent may import are held to the same rule.
    shared = [ROOT / "provisioning" / f"{name}.py" for name in AGENT_PROVISIONING]
    for path in [*sorted((ROOT / "device_agent").rglob("*.py")), *shared]:
        for module in _module_level_imports(path):
            allowed_in = AGENT_LAZY.get(module.split(".")[0])
            assert allowed_in is None or path.name in allowed_in, (
                f"{path.relative_to(ROOT)} imports {module} at module level"
            )


def test_only_the_bench_pulls_amqtt() -> None:
    """No installed product needs amqtt (the broker's engine is ours); the benchmark's reference
    broker is pinned exactly so the published comparison names a known version."""
    reqs = requires("iotauth") or []
    base = [r for r in reqs if "extra ==" not in r]
    runtime = [r for r in reqs if re.search(r'extra == "(agent|station|broker|all)"', r)]
    assert runtime, reqs
    assert not any(r.lower().startswith("amqtt") for r in base + runtime)
    bench = [r for r in reqs if re.search(r'extra == "bench"', r)]
    assert any(re.match(r"amqtt==\d", r) for r in bench), "amqtt must be pinned exactly"


def test_no_package_imports_amqtt() -> None:
    for package in sorted(OURS):
        for path in sorted((ROOT / package).rglob("*.py")):
            tops = {module.split(".")[0] for module in _imports(path)}
            assert "amqtt" not in tops, f"{path.relative_to(ROOT)} imports amqtt"


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
