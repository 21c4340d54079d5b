"""Static checks of the root Dockerfile and .dockerignore, for a machine with no Docker engine.

hadolint judges style; this module checks that the image is buildable from this tree: every
COPY source exists and survives `.dockerignore`, the pins equal the Makefile's, the image runs
as a numeric non-root user, and it declares a HEALTHCHECK.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: `keyword` upper-cased, `args` with continuations joined."""

    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, `\\` continuations joined)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    return instructions


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Build-context paths read by COPY/ADD (those with `--from=` read another stage)."""
    sources: list[str] = []
    for ins in instructions:
        if ins.keyword not in {"COPY", "ADD"}:
            continue
        words = shlex.split(ins.args)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])  # the last word is the destination
    return sources


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's matcher: Go `filepath.Match` per path element, plus `**` for any depth."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            members = pattern[i + 1 : end]
            out.append("[" + ("^" + members[1:] if members.startswith("!") else members) + "]")
            i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    return re.compile("".join(out) + r"\Z")


def is_ignored(path: str, dockerignore: str) -> bool:
    """True when `.dockerignore` keeps `path` (relative, `/`-separated) out of the context.

    Rules apply in order and the last match wins; `!` re-includes. A pattern that matches a
    parent directory matches everything below it, as in Docker.
    """
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().strip("/").removeprefix("./")
        rules.append((negate, _dockerignore_regex(pattern)))
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def makefile_variables(text: str) -> dict[str, str]:
    """`NAME := value` and `NAME ?= value` assignments of a Makefile (no expansion)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Z_][A-Z0-9_]*)\s*[:?]?=\s*(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    """Default values of every `ARG NAME=value` (quotes removed)."""
    found: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            found[name.strip()] = " ".join(shlex.split(value))
    return found


def check_dockerfile(root: Path) -> list[str]:
    """Problems that would make the image unbuildable or unsafe; empty when all is well."""
    problems: list[str] = []
    instructions = parse_dockerfile((root / "Dockerfile").read_text())
    ignore_file = root / ".dockerignore"
    if not ignore_file.is_file():
        return ["missing .dockerignore"]
    dockerignore = ignore_file.read_text()
    for source in copy_sources(instructions):
        if not (root / source).exists():
            problems.append(f"COPY source {source!r} does not exist")
        elif is_ignored(source, dockerignore):
            problems.append(f"COPY source {source!r} is excluded by .dockerignore")

    make = makefile_variables((root / "Makefile").read_text())
    args = dockerfile_args(instructions)
    for name in ("TORCH_VERSION", "MODEL_PACKAGES"):
        if args.get(name) != make.get(name):
            problems.append(f"ARG {name}={args.get(name)!r} != Makefile's {make.get(name)!r}")

    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    uid = args.get("FLORA_UID", "")
    final_user = users[-1].replace("${FLORA_UID}", uid).split(":")[0] if users else ""
    if not final_user.isdigit() or int(final_user) == 0:
        problems.append(f"final USER must be a numeric non-root uid, got {final_user!r}")
    if not any(ins.keyword == "HEALTHCHECK" for ins in instructions):
        problems.append("no HEALTHCHECK")
    stages = {ins.args.split()[-1] for ins in instructions if ins.keyword == "FROM"}
    for variant in ("cpu", "cuda"):
        if f"os-{variant}" not in stages:
            problems.append(f"no stage os-{variant} for --build-arg VARIANT={variant}")
    return problems


def runtime_uid(root: Path) -> int:
    """The uid the image runs as (the FLORA_UID build argument's default)."""
    args = dockerfile_args(parse_dockerfile((root / "Dockerfile").read_text()))
    return int(args["FLORA_UID"])


def runtime_env(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV of the final stage (`ENV A=1 B=2` or `ENV A 1`; no `$VAR` expansion)."""
    last_from = max((i for i, ins in enumerate(instructions) if ins.keyword == "FROM"), default=-1)
    env: dict[str, str] = {}
    for ins in instructions[last_from + 1 :]:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def prepared_models(instructions: list[Instruction]) -> frozenset[str]:
    """Models the build converts into the image's FLORA_HOME (`python -m M prepare NAME...`)."""
    names: set[str] = set()
    for ins in instructions:
        match = re.search(r"python3? -m [\w.]+ prepare ((?:[\w.-]+ ?)+)", ins.args)
        if ins.keyword == "RUN" and match:
            names.update(match.group(1).split())
    return frozenset(names)


def healthcheck_options(instructions: list[Instruction]) -> dict[str, str]:
    """The last HEALTHCHECK's options (`interval`, `start-period`, ...) and its `CMD` (the
    rest of the line, as written); empty when there is none or it is `NONE`."""
    found = [ins.args for ins in instructions if ins.keyword == "HEALTHCHECK"]
    if not found or found[-1].upper().startswith("NONE"):
        return {}
    options, _, command = found[-1].partition("CMD")
    parsed = dict(word.removeprefix("--").partition("=")[::2] for word in shlex.split(options))
    return {**parsed, "CMD": command.strip()}


def duration_seconds(value: str) -> float:
    """A Docker duration (`30s`, `5m`, `1m30s`, `500ms`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(ms|us|ns|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a Docker duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


def prepare_module(root: Path) -> str | None:
    """The `python -m MODULE` the build runs to prepare the model, if any."""
    for ins in parse_dockerfile((root / "Dockerfile").read_text()):
        match = re.search(r"python3? -m ([\w.]+) prepare", ins.args)
        if ins.keyword == "RUN" and match:
            return match.group(1)
    return None
