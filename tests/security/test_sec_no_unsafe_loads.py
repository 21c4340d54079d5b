"""Property 2: no pickle, `torch.load`, `eval`/`exec` or `trust_remote_code=True` anywhere in
the source tree (tests included), except the one-time EfficientNet conversion, found by
walking the AST (a comment or a docstring that names them is fine; a call is not)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["flora", "server", "clients", "bench", "deploy", "tests"]
ALLOWED = {
    ("flora/models/efficientnet_lite0.py", "torch.load"),  # one-time conversion, weights_only
    # These run the repository's own documentation examples (never client bytes).
    ("tests/unit/test_adapter_format.py", "exec"),
    ("tests/unit/test_readme.py", "exec"),
}
BANNED_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def findings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                out.append(node.module)
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "torch.load", "torch.jit.load") or name.endswith(
                (".load_state_dict_from_url", "pickle.loads", "pickle.load")
            ):
                out.append(name)
            for kw in node.keywords:
                value = kw.value
                if kw.arg == "trust_remote_code" and not (
                    isinstance(value, ast.Constant) and value.value is False
                ):
                    out.append("trust_remote_code")
    return out


def test_detector_catches_what_it_should():
    bad = (
        "import pickle\nfrom dill import loads\ntorch.load(p)\neval('1')\n"
        "f(trust_remote_code=True)\n"
    )
    assert sorted(findings(ast.parse(bad))) == sorted(
        ["pickle", "dill", "torch.load", "eval", "trust_remote_code"]
    )
    assert findings(ast.parse("model.eval()\n# torch.load is banned\n")) == []


def test_no_unsafe_deserialisation_in_the_tree():
    problems = []
    scanned = 0
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if ".venv" in path.parts or "site-packages" in path.parts:
                continue
            rel = path.relative_to(ROOT).as_posix()
            scanned += 1
            for name in findings(ast.parse(path.read_text(), filename=rel)):
                if (rel, name) not in ALLOWED:
                    problems.append(f"{rel}: {name}")
    assert scanned > 100
    assert problems == []
