"""Every `flora` command through typer's CliRunner against the stub server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from flora_stub_server import BASE, StubState, free_port
from typer.testing import CliRunner

from flora_client.cli import app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def flora(runner: CliRunner, url: str, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*args, "--url", url], input=input)


def assert_one_line_error(result, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1
    assert result.stderr == f"error: {expected}\n"
    assert "Traceback" not in result.output


def test_health(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    result = flora(runner, stub_url, "health")
    assert result.exit_code == 0
    assert result.stdout == f"{stub_url}: alive, ready\n"
    stub.ready = False
    result = runner.invoke(app, ["--json", "health"], env={"FLORA_URL": stub_url})
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"url": stub_url, "alive": True, "ready": False}


def test_unreachable_server_is_one_line(runner: CliRunner) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["--url", url, "adapters", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach {url}")
    assert result.stderr.count("\n") == 1


def test_adapters_upload_list_show_delete(
    runner: CliRunner, stub: StubState, stub_url: str, adapter_dir: Path
) -> None:
    blob = (adapter_dir / "adapter_config.json").read_bytes() + (
        adapter_dir / "adapter.safetensors"
    ).read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    config_size = (adapter_dir / "adapter_config.json").stat().st_size

    result = flora(runner, stub_url, "adapters", "upload", str(adapter_dir), "--id", "ad1")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"uploaded ad1, {len(blob):,} bytes, sha256 {digest}\n"

    result = flora(
        runner, stub_url, "adapters", "upload", str(adapter_dir), "--id", "ad1", "--json"
    )
    assert json.loads(result.stdout)["status"] == "unchanged"

    (adapter_dir / "adapter.safetensors").write_bytes(b"changed")
    result = flora(runner, stub_url, "adapters", "upload", str(adapter_dir), "--id", "ad1")
    assert_one_line_error(
        result,
        "409 conflict_error: adapter 'ad1' already exists with other bytes; "
        "pass --overwrite to replace it",
    )
    result = flora(
        runner, stub_url, "adapters", "upload", str(adapter_dir), "--id", "ad1", "--overwrite"
    )
    assert result.exit_code == 0
    assert result.stdout.startswith(f"replaced ad1, {config_size + 7} bytes")
    assert stub.last_form["overwrite"] == "true"
    digest2 = stub.adapters["ad1"]["sha256"]

    result = flora(runner, stub_url, "adapters", "list")
    assert result.exit_code == 0
    assert "1 adapter(s) of 1" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "ad1" in line)
    cells = [cell.strip() for cell in row.split("│")[1:5]]
    assert cells == ["ad1", f"{config_size + 7}", digest2[:12], "stored"]

    result = flora(runner, stub_url, "adapters", "list", "--json")
    listed = json.loads(result.stdout)
    assert [a["id"] for a in listed["data"]] == ["ad1"] and listed["total"] == 1

    result = flora(runner, stub_url, "adapters", "show", "ad1", "--json")
    shown = json.loads(result.stdout)
    assert shown["id"] == "ad1" and shown["config"] == {"format_version": 1, "method": "flora"}

    result = flora(runner, stub_url, "adapters", "delete", "ad1")
    assert result.exit_code == 0 and result.stdout == "deleted ad1\n"
    assert stub.adapters == {}
    result = flora(runner, stub_url, "adapters", "show", "ad1")
    assert_one_line_error(result, "404 not_found_error: adapter 'ad1' does not exist")


def test_upload_missing_path(runner: CliRunner, stub_url: str, tmp_path: Path) -> None:
    result = flora(runner, stub_url, "adapters", "upload", str(tmp_path / "nope"), "--id", "x")
    assert_one_line_error(result, f"no such adapter directory or file: {tmp_path / 'nope'}")


def test_forbidden_with_inference_key(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    stub.api_key, stub.admin_key = "user", "admin"
    result = runner.invoke(
        app, ["adapters", "list", "--url", stub_url], env={"FLORA_API_KEY": "user"}
    )
    assert_one_line_error(result, "403 permission_error: adapter management needs the admin key")
    result = runner.invoke(
        app, ["--api-key", "admin", "--url", stub_url, "adapters", "list", "--json"]
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["total"] == 0


def test_generate_streams_tokens(
    runner: CliRunner, stub: StubState, stub_url: str, adapter_dir: Path
) -> None:
    stub.adapters["ad"] = {"id": "ad"}
    result = flora(
        runner, stub_url, "generate", "a b c", "--adapter", "ad", "-n", "3", "--seed", "5"
    )
    assert result.exit_code == 0, result.output
    # The special end token is not printed.
    assert result.stdout == "[ad] c b\n"
    assert stub.attempts["POST /generate_stream"] == 1
    assert stub.last_json["parameters"] == {"max_new_tokens": 3, "seed": 5, "adapter_id": "ad"}


def test_generate_json_and_no_stream(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    result = flora(runner, stub_url, "generate", "x y", "--json", "--temperature", "0.7")
    body = json.loads(result.stdout)
    assert body["generated_text"] == " y x" and body["details"]["generated_tokens"] == 2
    assert stub.last_json["parameters"]["do_sample"] is True
    assert stub.last_json["parameters"]["temperature"] == 0.7
    result = flora(runner, stub_url, "generate", "x y", "--no-stream")
    assert result.stdout == " y x\n"
    assert stub.attempts["POST /generate"] == 2


def test_generate_validation_error(runner: CliRunner, stub_url: str, stub: StubState) -> None:
    result = flora(runner, stub_url, "generate", "x", "--no-stream", "-n", "1000")
    assert_one_line_error(
        result, "422 invalid_request_error: parameters.max_new_tokens: must be <= 100"
    )


def test_generate_unknown_adapter(runner: CliRunner, stub_url: str, stub: StubState) -> None:
    result = flora(runner, stub_url, "generate", "x", "--adapter", "ghost")
    assert_one_line_error(result, "404 not_found_error: adapter 'ghost' does not exist")


def test_chat_keeps_history(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    result = flora(
        runner,
        stub_url,
        "chat",
        "--system",
        "be nice",
        input="hello world\n\nagain\n/exit\nignored\n",
    )
    assert result.exit_code == 0, result.output
    assert "you>  world hello (turn 1)\n" in result.stdout
    assert " again (turn 2)\n" in result.stdout
    assert "ignored" not in result.stdout
    roles = [m["role"] for m in stub.last_json["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert stub.last_json["messages"][2]["content"] == " world hello (turn 1)"
    assert stub.last_json["model"] == BASE


def test_chat_reset_and_json(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    result = flora(runner, stub_url, "chat", "--json", input="one\n/reset\ntwo\n")
    assert result.exit_code == 0, result.output
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert replies == [
        {"role": "assistant", "content": " one (turn 1)"},
        {"role": "assistant", "content": " two (turn 1)"},
    ]


def test_classify_files(runner: CliRunner, stub: StubState, stub_url: str, tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"x" * 9)  # index 3: bird
    second.write_bytes(b"x" * 10)  # index 4: tree
    result = flora(runner, stub_url, "classify", str(first), str(second), "--top-k", "2", "--json")
    body = json.loads(result.stdout)
    assert [[c["label"] for c in r] for r in body["results"]] == [["bird", "cat"], ["tree", "cat"]]
    result = flora(runner, stub_url, "classify", str(first), "--top-k", "1")
    assert result.exit_code == 0 and "bird" in result.stdout and "0.9000" in result.stdout
    result = flora(runner, stub_url, "classify", str(tmp_path / "missing.png"))
    assert result.exit_code == 1 and "missing.png" in result.stderr


def test_classify_texts(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    result = flora(runner, stub_url, "classify", "--text", "hello", "--top-k", "1", "--json")
    assert json.loads(result.stdout)["results"][0][0]["label"] == "car"  # len 5 -> index 5
    assert stub.last_json["inputs"] == ["hello"]


def test_embed(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    result = flora(runner, stub_url, "embed", "banana", "--json")
    assert json.loads(result.stdout) == {"model": BASE, "embeddings": [[6.0, 3.0, 0.0]]}
    result = flora(runner, stub_url, "embed", "aa")
    assert result.stdout == "'aa': dim 3, norm 2.8284, [2.0000, 2.0000, 0.0000, ...]\n"


def test_models(runner: CliRunner, stub: StubState, stub_url: str) -> None:
    stub.adapters["ad"] = {"id": "ad"}
    result = flora(runner, stub_url, "models", "--json")
    assert [(m["id"], m["parent"]) for m in json.loads(result.stdout)["data"]] == [
        (BASE, None),
        ("ad", BASE),
    ]
    result = flora(runner, stub_url, "models")
    assert "stub-base" in result.stdout and "loaded" in result.stdout and "stored" in result.stdout


def test_overloaded_error_line_mentions_retry_after(
    runner: CliRunner, stub: StubState, stub_url: str, adapter_dir: Path
) -> None:
    stub.fail_plan["POST /v1/adapters"] = [(429, "4")]
    result = flora(runner, stub_url, "adapters", "upload", str(adapter_dir), "--id", "a")
    assert_one_line_error(result, "429 rate_limit_error: injected 429 (retry after 4 s)")
