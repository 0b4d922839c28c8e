"""Usage errors are one line, and every command's help is readable at 80 columns (issue 17, 14).

The README promises one line for bad input; typer's default draws a multi-line box for a usage
error, labels flags ``<bool>``, placeholders ``<list[str]>``, and cuts option names where its
boxes meet 80 columns. ``iotauth.cli.root_command`` is the tree ``iotauth`` runs.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator

import pytest

from iotauth.cli import root_command
from tests.conftest import Result, assert_one_line_error


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["ca", "init", "--bogus"], ["No such option: --bogus", "'iotauth ca init --help'"]),
        (["ca", "init"], ["Missing option '--pki'", "'iotauth ca init --help'"]),
        (["device", "issue"], ["Missing argument 'DEVICE_ID'", "'iotauth device issue --help'"]),
        (["broker", "run", "--pki", "x", "--port", "abc"], ["'--port'", "integer"]),
        (["fleet", "simulate", "--devices"], ["--devices", "'iotauth fleet simulate --help'"]),
        (["nosuchcommand"], ["No such command", "'iotauth --help'"]),
        (["agent", "run", "--store"], ["--store", "'iotauth agent run --help'"]),
    ],
)
def test_a_usage_error_is_one_line_with_the_help_hint(
    cli: Callable[..., Result], argv: list[str], fragments: list[str]
) -> None:
    result = cli(*argv)
    assert_one_line_error(result, *fragments)
    assert result.returncode == 2
    assert result.stdout == ""


ROOT = root_command()  # built once: help rendering does not change it


def _commands() -> Iterator[list[str]]:
    """The argv of every command and group, depth first."""
    stack: list[tuple[list[str], object]] = [([], ROOT)]
    while stack:
        path, command = stack.pop()
        if path != ["agent", "run"]:  # its --help is the slim argparse one (tests/device_agent)
            yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            stack.append(([*path, name], sub))


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ROOT.main([*argv, "--help"], prog_name="iotauth", standalone_mode=False)
    assert code == 0, argv
    return out.getvalue()


@pytest.mark.parametrize("argv", list(_commands()), ids=lambda a: " ".join(a) or "iotauth")
def test_help_fits_80_columns_and_names_its_placeholders(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _help(argv)
    assert text.startswith("Usage: iotauth"), text
    for line in text.splitlines():
        assert len(line) <= 80, line
    for bad in ("<bool>", "<list[", "╭", "│"):
        assert bad not in text, f"{bad!r} in:\n{text}"
    options = [line for line in text.splitlines() if line.lstrip().startswith("-")]
    assert not [o for o in options if re.search(r"<[a-z]", o)], text  # PATH, TEXT: not <path>
    command: object = ROOT
    for name in argv:
        command = command.commands[name]  # type: ignore[attr-defined]
    for param in command.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert opt in text, f"{opt} cut from the help:\n{text}"
