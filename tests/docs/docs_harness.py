"""Run the code blocks of README.md and docs/*.md as a newcomer would, in order.

Every fenced block either runs or is marked, on the line just before its opening fence:

- ``<!-- illustrative: REASON -->``: shown, not run (a synopsis, a full run that takes an
  hour, a manifest);
- ``<!-- output -->``: the output of the runnable block before it, regenerated from a real
  run by ``python tests/docs/docs_harness.py --write``.

A line ``<!-- docs-test: server MODEL -->`` anywhere in a page makes the blocks after it
run against a real ``flora-serve --model MODEL`` on 127.0.0.1 (started once per model and
shared by the pages that follow). ``127.0.0.1:8000`` and ``localhost:8000`` in a block
become that server's address, and ``$URL`` / ``$FLORA_URL`` point at it.

Blocks run like this: ``bash``/``sh`` with ``set -euo pipefail`` (and ``curl`` failing on
an HTTP error status); ``console`` runs its ``$ `` lines; ``python`` runs in a fresh
interpreter, so a block that silently depends on the one before it fails. All pages share
one working directory, where ``.venv`` links to the project's environment: ``runs/``
written by one page is there for the next, as it would be for a reader.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# The reading order of a newcomer: the README first, then the guides it links to.
PAGES = (
    "README.md",
    "docs/training.md",
    "docs/server.md",
    "docs/clients.md",
    "docs/compat.md",
    "docs/flora.md",
    "docs/models.md",
    "docs/engine.md",
    "docs/performance.md",
    "docs/security.md",
    "docs/deploy.md",
    "docs/architecture.md",
)
RUNNABLE = {"bash", "sh", "console", "python"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+)(?P<lang>[\w+-]*)\s*$")
MARK = re.compile(r"^\s*<!--\s*(?P<kind>illustrative|output)\b:?\s*(?P<reason>.*?)\s*-->\s*$")
SERVER = re.compile(r"^<!--\s*docs-test:\s*server\s+(?P<model>\S+)\s*-->\s*$")
BLOCK_TIMEOUT = 900  # seconds: the quick-start training is the longest block


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mark: str | None = None  # "illustrative" | "output" | None (runs)
    reason: str = ""
    server: str | None = None  # the model whose server this block talks to
    end: int = 0  # 1-based line of the closing fence

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Page:
    path: str
    lines: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


def parse(path: str, text: str | None = None) -> Page:
    """The fenced blocks of one page, with their markers and the server they talk to."""
    text = (ROOT / path).read_text() if text is None else text
    page = Page(path, text.splitlines())
    server: str | None = None
    i = 0
    while i < len(page.lines):
        line = page.lines[i]
        if found := SERVER.match(line):
            server = found["model"]
        opening = FENCE.match(line)
        if opening is None:
            i += 1
            continue
        j = i + 1
        while j < len(page.lines) and not page.lines[j].strip().startswith(opening["fence"]):
            j += 1
        previous = page.lines[i - 1] if i else ""
        mark = MARK.match(previous)
        page.blocks.append(
            Block(
                page=path,
                line=i + 1,
                lang=opening["lang"],
                text="\n".join(page.lines[i + 1 : j]) + "\n",
                mark=mark["kind"] if mark else None,
                reason=mark["reason"] if mark else "",
                server=server,
                end=j + 1,
            )
        )
        i = j + 1
    return page


def problems(page: Page) -> list[str]:
    """Blocks that neither run nor say why not."""
    found = []
    for block in page.blocks:
        if block.mark == "illustrative" and not block.reason:
            found.append(f"{block.name}: illustrative needs a reason")
        elif block.mark is None and block.lang not in RUNNABLE:
            found.append(
                f"{block.name}: a {block.lang or 'plain'} block must be runnable "
                "(bash, sh, console, python) or marked illustrative/output"
            )
    return found


class Servers:
    """One real flora-serve per model, started on first use, each with its own store."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._running: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def url(self, model: str) -> str:
        if model not in self._running:
            self._running[model] = self._start(model)
        return self._running[model][1]

    def _start(self, model: str) -> tuple[subprocess.Popen[bytes], str]:
        with contextlib.closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = self.workdir / ".docs-stores" / model
        log = (self.workdir / f".docs-server-{model}.log").open("wb")
        cmd = [sys.executable, "-m", "flora_server.cli", "--model", model, "--port", str(port)]
        cmd += ["--adapter-store", str(store)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flora-serve --model {model} exited: see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return proc, url
            time.sleep(0.3)
        proc.kill()
        raise RuntimeError(f"flora-serve --model {model} not ready after 300 s")

    def close(self) -> None:
        for proc, _ in self._running.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._running.clear()


@dataclass
class Result:
    block: Block
    returncode: int
    output: str


def _script(block: Block, url: str | None) -> tuple[list[str], str]:
    text = block.text
    if url is not None:
        text = text.replace("http://127.0.0.1:8000", url).replace("http://localhost:8000", url)
        text = text.replace("127.0.0.1:8000", url.removeprefix("http://"))
        text = text.replace("localhost:8000", url.removeprefix("http://"))
    if block.lang == "python":
        return [sys.executable, "-c", text], text
    if block.lang == "console":
        text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("$ "))
    prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; }\n'
    return ["bash", "-c", prelude + text], text


def run_block(block: Block, workdir: Path, servers: Servers) -> Result:
    url = servers.url(block.server) if block.server else None
    argv, _ = _script(block, url)
    env = {**os.environ, "PATH": f"{workdir / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"}
    # Output as a terminal shows it (stderr in its place), without the loaders' progress
    # bars, whose rates would change every regenerated output.
    env |= {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if url is not None:
        env |= {"URL": url, "FLORA_URL": url}
    proc = subprocess.run(
        argv,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    return Result(block, proc.returncode, as_terminal_shows(proc.stdout))


def as_terminal_shows(raw: bytes) -> str:
    """Captured output as a terminal leaves it: a line redrawn with carriage returns (a
    progress bar) keeps only its last drawing."""
    text = raw.decode("utf-8", errors="replace")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A reader's working directory: empty but for `.venv`, the project's environment."""
    with tempfile.TemporaryDirectory(prefix="flora-docs-") as tmp:
        workdir = Path(tmp)
        venv = Path(sys.executable).parent.parent
        (workdir / ".venv").symlink_to(venv)
        yield workdir


def run_pages(pages: tuple[str, ...] = PAGES) -> Iterator[Result]:
    """Every runnable block of every page, in reading order; stops the servers at the end."""
    with workspace() as workdir:
        servers = Servers(workdir)
        try:
            for path in pages:
                for block in parse(path).blocks:
                    if block.mark is None:
                        yield run_block(block, workdir, servers)
        finally:
            servers.close()


def rewrite_outputs(results: list[Result]) -> list[str]:
    """Write each run's output into the ``<!-- output -->`` block right after it."""
    changed = []
    by_page: dict[str, list[Result]] = {}
    for result in results:
        by_page.setdefault(result.block.page, []).append(result)
    for path, page_results in by_page.items():
        page = parse(path)
        lines = list(page.lines)
        ran = {r.block.line: r for r in page_results}
        # Back to front, so earlier line numbers stay valid while later blocks change.
        pairs = list(zip(page.blocks, page.blocks[1:], strict=False))
        for source, target in reversed(pairs):
            if target.mark != "output" or source.line not in ran:
                continue
            output = ran[source.line].output.rstrip("\n").splitlines()
            lines[target.line : target.end - 1] = output
        new = "\n".join(lines) + "\n"
        if new != (ROOT / path).read_text():
            (ROOT / path).write_text(new)
            changed.append(path)
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate the output blocks")
    parser.add_argument("pages", nargs="*", default=list(PAGES), help="pages, in order")
    args = parser.parse_args()
    results, failed = [], 0
    for result in run_pages(tuple(args.pages)):
        results.append(result)
        status = "ok" if result.returncode == 0 else f"FAILED ({result.returncode})"
        print(f"{result.block.name}: {status}", flush=True)
        if result.returncode:
            failed += 1
            print(result.output[-3000:])
    if args.write and not failed:
        for path in rewrite_outputs(results):
            print(f"rewrote outputs in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
