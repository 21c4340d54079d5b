"""README.md and docs/*.md: every block runs as written, or says why it is only shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from docs_harness import (
    PAGES,
    ROOT,
    Block,
    Servers,
    as_terminal_shows,
    parse,
    problems,
    run_block,
    run_pages,
)


def test_the_harness_reads_every_page_of_the_docs() -> None:
    on_disk = {"README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))}
    assert on_disk == set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_every_block_runs_or_says_why_not(page: str) -> None:
    assert problems(parse(page)) == []


def test_a_marker_inside_a_list_item_is_read() -> None:
    page = parse("x.md", "- a file:\n  <!-- illustrative: an excerpt -->\n  ```json\n  {}\n  ```\n")
    assert [(b.lang, b.mark, b.reason) for b in page.blocks] == [
        ("json", "illustrative", "an excerpt")
    ]
    assert problems(page) == []


def test_markers_languages_and_servers_are_read() -> None:
    page = parse(
        "x.md",
        "<!-- docs-test: server tiny -->\n"
        "```bash\necho hi\n```\n"
        "<!-- output -->\n```\nhi\n```\n"
        "<!-- illustrative: a synopsis -->\n```\nflora-train RECIPE\n```\n"
        "```json\n{}\n```\n",
    )
    runs, output, shown, _bare = page.blocks
    assert (runs.lang, runs.mark, runs.server, runs.text) == ("bash", None, "tiny", "echo hi\n")
    assert (output.mark, output.text) == ("output", "hi\n")
    assert (shown.mark, shown.reason) == ("illustrative", "a synopsis")
    assert problems(page) == [
        "x.md:13: a json block must be runnable (bash, sh, console, "
        "python) or marked illustrative/output"
    ]


@pytest.mark.parametrize(
    ("lang", "text", "ok"),
    [
        ("bash", "echo fine\n", True),
        ("bash", "false\necho never\n", False),  # set -e
        ("bash", "false | cat\n", False),  # pipefail
        ("bash", "curl -s http://127.0.0.1:9/nothing\n", False),  # refused: curl exits 7
        ("python", "print(1 + 1)\n", True),
        ("python", "print(messages)\n", False),  # no state leaks in from an earlier block
        ("console", "$ echo ok\nok\n$ exit 3\n", False),
    ],
)
def test_a_broken_block_fails(tmp_path: Path, lang: str, text: str, ok: bool) -> None:
    (tmp_path / ".venv").mkdir()
    block = Block(page="x.md", line=1, lang=lang, text=text)
    result = run_block(block, tmp_path, Servers(tmp_path))
    assert (result.returncode == 0) is ok, result.output


@pytest.mark.integration
@pytest.mark.slow
def test_every_runnable_block_runs_against_real_servers() -> None:
    failures = [
        f"{r.block.name} exited {r.returncode}:\n{r.output[-2000:]}"
        for r in run_pages()
        if r.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)


def test_output_keeps_stderr_in_its_place(tmp_path: Path) -> None:
    (tmp_path / ".venv").mkdir()
    block = Block(page="x.md", line=1, lang="bash", text="echo a\necho b >&2\necho c\n")
    assert run_block(block, tmp_path, Servers(tmp_path)).output == "a\nb\nc\n"


def test_a_redrawn_progress_line_keeps_its_last_drawing() -> None:
    raw = b"eval:   0%|\reval:  50%|\reval: 100%|\nadapter: 0.88\n"
    assert as_terminal_shows(raw) == "eval: 100%|\nadapter: 0.88\n"
