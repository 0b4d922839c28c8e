"""Every `iotauth` command in the README's walkthrough runs, in order, as written."""

from __future__ import annotations

import re
import shlex
import subprocess
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


ROOT = README.parent
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"


def _status_rows() -> list[tuple[str, str, str]]:
    """(part, state, evidence) of each row of the README's status table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Status", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("part", "---"):
            rows.append((cells[0], cells[1], cells[2]))
    assert len(rows) >= 5, "the README lost its status table"
    return rows


def _slug(title: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _benchmark_sections() -> dict[str, str]:
    text = BENCHMARKS.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {_slug(p.splitlines()[0]): p for p in parts}


def _verdict(text: str) -> str | None:
    """'miss' or 'met' as a benchmark section states its target; None if it states neither."""
    if re.search(r"\b(not met|miss(es|ed)?)\b", text, flags=re.IGNORECASE):
        return "miss"
    if re.search(r"\bmet\b", text, flags=re.IGNORECASE):
        return "met"
    return None


def test_status_table_rows_cite_evidence_that_exists() -> None:
    """Each row names tests that exist and benchmark sections that exist, and agrees with them."""
    sections = _benchmark_sections()
    for part, state, evidence in _status_rows():
        cited = re.findall(r"`([^`]+)`", evidence)
        tests = [c for c in cited if c.startswith("tests/")]
        assert tests, f"{part}: no test named as evidence"
        for path in cited:
            file, _, anchor = path.partition("#")
            assert (ROOT / file).is_file(), f"{part}: {file} does not exist"
            if anchor:
                assert file == "docs/BENCHMARKS.md", path
                assert anchor in sections, f"{part}: no section #{anchor} in docs/BENCHMARKS.md"
                verdict = _verdict(sections[anchor])
                if verdict is not None:
                    assert re.search(rf"\b{verdict}\b", state), (
                        f"{part}: docs/BENCHMARKS.md#{anchor} says the target is {verdict}, "
                        f"the README says {state!r}"
                    )
        assert "not yet tested" not in state, f"{part}: cite the test instead, or leave the claim"


def test_readme_counts_the_benchmarks_make_bench_runs() -> None:
    text = README.read_text(encoding="utf-8")
    said = re.search(r"make bench +# the (\d+) benchmarks of bench/run_all\.py", text)
    assert said is not None, "the README no longer says what `make bench` runs"
    run_all = (ROOT / "bench" / "run_all.py").read_text(encoding="utf-8")
    benches = run_all.split("BENCHES", 1)[1].split("\n]\n", 1)[0]
    names = re.findall(r'^    \(\s*"(\w+)",', benches, flags=re.MULTILINE)
    assert int(said[1]) == len(names), names


def test_no_tracked_file_points_outside_the_repository() -> None:
    """A reader who clones the repository has no ../shared and no /work (issue 17, item 17)."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert files, "not a git checkout"
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()
    offending = []
    for name in files:
        path = ROOT / name
        if name == me or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if "../shared" in line or "/work/" in line:
                offending.append(f"{name}:{number}: {line.strip()}")
    assert offending == []


def test_readme_leaves_nothing_untracked_in_the_repository() -> None:
    """The README sends readers to a scratch directory, and every directory its commands write
    (``--pki``, ``--out``, ``--store``, ``--export``) is ignored by git should they run here."""
    text = README.read_text(encoding="utf-8")
    walkthrough = text.split("## The fleet PKI in six commands", 1)[1]
    before_first = walkthrough.split("\niotauth ", 1)[0]
    assert re.search(r"^mkdir -p \S+ && cd \S+", before_first, flags=re.MULTILINE), before_first
    written = set(re.findall(r"--(?:pki|out|store|export) \./([\w.-]+)", text))
    assert {"pki", "creds", "dev-a", "mosquitto"} <= written, written
    ignored = subprocess.run(
        ["git", "check-ignore", *(f"{d}/" for d in sorted(written))],
        cwd=ROOT, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert sorted(d.rstrip("/") for d in ignored) == sorted(written)
