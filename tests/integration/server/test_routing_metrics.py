"""Against one real `flora-serve` process (a tiny random Llama with SmolLM2's tokenizer, one
adapter, `--log-format json`): every metric the endpoint picker's configuration, the Grafana
dashboard and the alert rules read is one the server exports on /metrics; the adapter shows
up in the residency gauge; X-Request-Id round-trips over real HTTP (plain and SSE) and lands
in the JSON access log on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy.routing import (
    dashboard_exprs,
    epp_metric_names,
    family_name,
    load_dashboard,
    promql_metric_names,
    rule_exprs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[3]
T = 60
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora import FloraConfig, adapter_layers, inject
    from flora.adapter import save_adapter
    from flora.models.storage import home

    tokenizer_dir = home() / "models" / "smollm2-135m-instruct"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not converted under FLORA_HOME (run `python -m flora.models`)")
    work = tmp_path_factory.mktemp("routing-metrics")
    model_dir = work / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    model = inject(model, FloraConfig(target_modules=["q_proj", "v_proj"], rank=4))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.core.normal_(0.0, 1.0)
    adapter = save_adapter(model, work / "ad1", base_model_id="tiny-llama")
    port = _free_port()
    log = work / "server.log"
    cmd = [
        sys.executable, "-m", "flora_server.cli", "--model", str(model_dir), "--port", str(port),
        "--home", str(work / "home"), "--adapter", f"ad1={adapter}", "--log-format", "json",
        "--max-new-tokens", "16", "--default-max-new-tokens", "8",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "not ready after 180 s"
            time.sleep(0.3)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _exported(url: str) -> tuple[set[str], str]:
    """Every name a query could use: sample names, and each family's names by its type (a
    labelled family with no samples yet still counts)."""
    text = httpx.get(f"{url}/metrics", timeout=T).text
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
    return names, text


def test_epp_dashboard_and_alerts_read_only_exported_metrics(server) -> None:
    url, _ = server
    exported, _ = _exported(url)
    component = ROOT / "deploy" / "k8s" / "components" / "inference-pool"
    epp = epp_metric_names(yaml.safe_load((component / "epp-config.yaml").read_text()))
    assert set(epp.values()) == {
        "flora_queue_length",
        "flora_running_batch_size",
        "flora_kv_cache_usage_perc",
        "vllm:lora_requests_info",
    }
    assert {k: v for k, v in epp.items() if v not in exported} == {}
    rules = yaml.safe_load(
        (ROOT / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule.yaml").read_text()
    )
    queried = {
        name
        for expr in [*dashboard_exprs(load_dashboard(ROOT)), *rule_exprs(rules)]
        for name in promql_metric_names(expr)
    }
    assert len(queried) >= 12  # the parser found the dashboard's and the rules' metrics
    assert queried - exported == set()
    # the vLLM-named gauges a picker left on its built-in `vllm` engine would read
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running"} <= exported
    assert {family_name(n) for n in queried} >= {"flora_adapter_load_seconds"}


def test_request_id_round_trip_residency_and_json_access_log(server) -> None:
    url, log = server
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "adapter_id": "ad1"}}
    r = httpx.post(f"{url}/generate", json=body, headers={"X-Request-Id": "it-plain"}, timeout=T)
    assert r.status_code == 200 and r.headers["x-request-id"] == "it-plain"
    with httpx.stream(
        "POST", f"{url}/generate_stream", json=body, headers={"X-Request-Id": "it-sse"}, timeout=T
    ) as s:
        assert s.status_code == 200 and s.headers["x-request-id"] == "it-sse"
        events = [json.loads(x[5:]) for x in s.iter_lines() if x.startswith("data:")]
    assert events[-1]["details"]["generated_tokens"] == 4
    r = httpx.post(f"{url}/generate", json={"inputs": ""}, timeout=T)
    assert r.status_code == 422 and len(r.headers["x-request-id"]) == 32

    _, text = _exported(url)
    lines = text.splitlines()
    resident = 'flora_lora_adapter_loaded{adapter="ad1",model_name="%s",tier="%s"} 1.0'
    model = next(
        x.split('model_name="')[1].split('"')[0]
        for x in lines
        if x.startswith("flora_kv_cache_usage_perc{")
    )
    assert resident % (model, "device") in lines
    assert resident % (model, "host") in lines
    assert f'flora_kv_cache_usage_perc{{model_name="{model}"}} 0.0' in lines  # v1: no pool

    deadline = time.monotonic() + 10
    while True:
        records = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        access = {x["request_id"]: x for x in records if x["logger"] == "flora_server.access"}
        if {"it-plain", "it-sse"} <= set(access) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for rid, route in (("it-plain", "/generate"), ("it-sse", "/generate_stream")):
        line = access[rid]
        assert (line["route"], line["status"], line["adapter"]) == (route, 200, "ad1")
        assert line["generated_tokens"] == 4 and line["prompt_tokens"] >= 1
        assert 0 <= line["queue_s"] <= line["ttft_s"] <= line["total_s"]
    assert access["it-plain"]["cold"] in (True, False)
    assert access["it-sse"]["cold"] is False  # the first request left it on a device slot
