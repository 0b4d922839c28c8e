"""Every `iotauth` command in the README's walkthrough runs, in order, as written."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Result

README = Path(__file__).resolve().parent.parent / "README.md"


def _walkthrough() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)
    commands = [
        shlex.split(line, comments=True)
        for block in blocks
        for line in block.splitlines()
        if line.startswith("iotauth ")
    ]
    assert len(commands) >= 6, "the README lost its walkthrough"
    return commands


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert first_block is not None
    lines = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert lines == ["make demo", "make test"]


def test_readme_commands_run(cli: Callable[..., Result], tmp_path: Path) -> None:
    for argv in _walkthrough():
        result = cli(*argv[1:])
        assert result.returncode == 0, f"{shlex.join(argv)}: {result.stderr}"
    assert (tmp_path / "creds" / "dev-0001" / "device.key").exists()
