"""Settings (env FLORA_*), CLI flags, and the adapter metric labeler."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flora_server.cli import build_parser, parse_settings
from flora_server.metrics import AdapterLabeler
from flora_server.settings import Settings, is_valid_adapter_id, parse_adapter_spec


def test_defaults(monkeypatch):
    for key in ("FLORA_HOME", "FLORA_PORT", "FLORA_MODEL"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.model, s.device, s.host, s.port) == (
        "smollm2-135m-instruct",
        "cpu",
        "127.0.0.1",
        8000,
    )
    assert s.adapter_store_dir == Path("~/.cache/flora/adapters").expanduser()
    assert not s.auth_enabled


def test_env_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FLORA_HOME", str(tmp_path))
    monkeypatch.setenv("FLORA_PORT", "9001")
    monkeypatch.setenv("FLORA_API_KEYS", "k1, k2")
    monkeypatch.setenv("FLORA_MAX_QUEUE", "7")
    s = parse_settings(
        [
            "--port",
            "9002",
            "--adapter",
            "x=/a",
            "--adapter",
            "/b/yy",
            "--preload",
            "--device",
            "cuda:1",
            "--no-metrics-public",
        ]
    )
    assert s.port == 9002  # flag beats env
    assert s.max_queue == 7 and s.api_keys == ["k1", "k2"]
    assert s.adapters == ["x=/a", "/b/yy"] and s.preload is True and s.device == "cuda:1"
    assert s.metrics_public is False
    assert s.adapter_store_dir == tmp_path / "adapters"


def test_factor_dtype_is_also_read_under_its_older_names(monkeypatch):
    monkeypatch.delenv("FLORA_FACTOR_DTYPE", raising=False)
    monkeypatch.setenv("FLORA_ADAPTER_DTYPE", "bfloat16")
    assert Settings().factor_dtype == "bfloat16"
    monkeypatch.setenv("FLORA_FACTOR_DTYPE", "float32")  # the current name wins
    assert Settings().factor_dtype == "float32"
    monkeypatch.delenv("FLORA_ADAPTER_DTYPE")
    monkeypatch.delenv("FLORA_FACTOR_DTYPE")
    monkeypatch.setenv("FACTOR_DTYPE", "bfloat16")  # no prefix: not ours
    assert Settings().factor_dtype == "auto"
    assert parse_settings(["--adapter-dtype", "bfloat16"]).factor_dtype == "bfloat16"
    assert parse_settings(["--factor-dtype", "float32"]).factor_dtype == "float32"
    assert Settings(factor_dtype="float32").factor_dtype == "float32"
    assert "--adapter-dtype" not in build_parser().format_help()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device": "gpu"},
        {"port": 70000},
        {"max_queue": 0},
        {"adapters": ["bad..name=/tmp"]},
        {"api_keys": ["a"], "admin_keys": ["a"]},
        {"default_max_new_tokens": 10, "max_new_tokens": 5},
    ],
)
def test_validation_errors(kwargs):
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_adapter_spec_and_ids():
    assert parse_adapter_spec("name=/some/dir") == ("name", Path("/some/dir"))
    assert parse_adapter_spec("/some/dir-2") == ("dir-2", Path("/some/dir-2"))
    assert is_valid_adapter_id("A.b_c-9") and not is_valid_adapter_id("a..b")
    assert not is_valid_adapter_id("_x") and not is_valid_adapter_id("x" * 129)


def test_labeler_bounds_cardinality():
    lab = AdapterLabeler(top_n=2)
    assert [lab.label(a) for a in ("a", "b", "c")] == ["a", "b", "other"]
    assert lab.label(None) == "base"
    # c reaches 2 > b's 1 and takes b's label; then b reaches 2 > a's 1 and takes a's.
    assert lab.label("c") == "c" and lab.label("b") == "b"
    assert lab.label("a") == "other"  # a at 2 does not pass the weakest labelled (2)
    labels = {lab.label(f"id{i}") for i in range(1000) for _ in range(3)}
    assert len(labels - {"other"}) <= 4  # never more than 2 * top_n distinct ids


def test_device_message_and_help_name_every_accepted_form():
    """The message and the --device help list exactly what the validator accepts (mps too)."""
    for device in ("cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert Settings(device=device).device == device
    for bad in ("gpu", "cuda:", "mps:0", "CPU"):
        with pytest.raises(ValidationError) as info:
            Settings(device=bad)
        assert f"device must be cpu, cuda, cuda:N or mps, not {bad!r}" in str(info.value)
    (action,) = [a for a in build_parser()._actions if "--device" in a.option_strings]
    assert action.help.startswith("cpu, cuda, cuda:N or mps (env FLORA_DEVICE")


@pytest.mark.parametrize("host", ["", "   "])
def test_an_empty_host_is_refused(monkeypatch, host):
    """uvicorn binds an empty host on every interface (0.0.0.0 and ::)."""
    with pytest.raises(ValidationError) as info:
        Settings(host=host)
    assert info.value.errors()[0]["loc"] == ("host",)
    monkeypatch.setenv("FLORA_HOST", host)
    with pytest.raises(ValidationError, match="must not be empty"):
        Settings()
    assert Settings(host="0.0.0.0").host == "0.0.0.0"  # every interface, said explicitly


def test_empty_list_flags_mean_nothing_but_an_empty_key_is_refused(monkeypatch):
    monkeypatch.setenv("FLORA_LORA_DIRS", "")
    assert Settings().lora_dirs == []
    monkeypatch.delenv("FLORA_LORA_DIRS")
    assert parse_settings(["--lora-dirs", ""]).lora_dirs == []  # as the empty env value
    both = parse_settings(["--lora-dirs", " /srv/a ", "--lora-dirs", " ", "--adapter", ""])
    assert both.lora_dirs == ["/srv/a"] and both.adapters == []
    # `--api-key "$KEY"` with KEY unset must not start an open server.
    with pytest.raises(ValidationError, match="empty key"):
        parse_settings(["--api-key", ""])


def test_lora_dirs_must_be_absolute(tmp_path):
    for relative in (".", "loras", "./loras"):
        with pytest.raises(ValidationError, match="is not an absolute path") as info:
            parse_settings(["--lora-dirs", relative])
        assert info.value.errors()[0]["loc"] == ("lora_dirs",)
    assert Settings(lora_dirs=["~/loras"]).lora_dirs == [str(Path("~/loras").expanduser())]
    assert Settings(lora_dirs=f"{tmp_path},/srv/x").lora_dirs == [str(tmp_path), "/srv/x"]


def test_confined_path_never_takes_an_empty_or_relative_root_for_the_cwd(tmp_path, monkeypatch):
    from flora_server.adapters.local_source import LocalPathError, confined_path

    (tmp_path / "adapter").mkdir()
    monkeypatch.chdir(tmp_path)
    for roots in ([""], ["."], ["adapter"], [str(tmp_path), ""]):
        for path in ("adapter", str(tmp_path / "adapter")):
            with pytest.raises(LocalPathError, match="empty or relative"):
                confined_path(path, roots)
    assert confined_path("adapter", [str(tmp_path)]) == tmp_path / "adapter"


def test_store_and_home_must_be_usable_directories(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValidationError, match="is not a directory") as info:
        Settings(adapter_store=str(afile))
    assert info.value.errors()[0]["loc"] == ("adapter_store",)
    with pytest.raises(ValidationError, match="is inside a file") as info:
        Settings(home=afile / "home")
    assert info.value.errors()[0]["loc"] == ("home",)
    # Not there yet is fine: the server makes it.
    new = tmp_path / "a" / "b"
    assert Settings(adapter_store=str(new), home=new).adapter_store_dir == new
    assert not new.exists()
