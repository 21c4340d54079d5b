"""Adapters people already have, on the real SmolLM2-135M-Instruct served in-process.

A PEFT LoRA made here with real `peft` (random non-zero B) is uploaded over HTTP exactly as
`save_pretrained` wrote it, loaded through vLLM's `/v1/load_lora_adapter`, named by path with
LoRAX's `adapter_source="local"`, and merged per request; each answer is compared with what
PEFT itself generates greedily for the same base and prompt.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BASE = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
N = 12


def _peft_lora(out: Path, seed: int, **config) -> tuple[Path, list[int]]:
    """Save a PEFT LoRA with random non-zero B; return its directory and the greedy tokens
    PEFT generates with it for PROMPT."""
    from peft import LoraConfig, get_peft_model

    from flora import models as zoo

    loaded = zoo.load(BASE)
    tok = loaded.preprocessor
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    model = get_peft_model(loaded.model, LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out_ids = model.generate(ids, max_new_tokens=N, do_sample=False)
    model.save_pretrained(out)
    return out, out_ids[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    plain = _peft_lora(root / "plain", 1)
    rslora = _peft_lora(root / "rs", 2, use_rslora=True, r=4, lora_alpha=8)
    return root, plain, rslora


@pytest.fixture(scope="module")
def client(tmp_path_factory, peft_dirs):
    from flora_server.main import create_app
    from flora_server.settings import Settings

    work = tmp_path_factory.mktemp("srv")
    settings = Settings(
        model=BASE,
        adapter_store=str(work / "store"),
        lora_dirs=[str(peft_dirs[0])],
        max_slots=4,
        max_batch_size=8,
        max_new_tokens=64,
    )
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 300
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, c.get("/ready").json()
            time.sleep(0.2)
        yield c


def _upload(client, adapter_id: str, directory: Path, config: bytes | None = None):
    config = config or (directory / "adapter_config.json").read_bytes()
    weights = (directory / "adapter_model.safetensors").read_bytes()
    files = {
        "config": ("adapter_config.json", config),
        "weights": ("adapter_model.safetensors", weights),
    }
    return client.post("/v1/adapters", data={"adapter_id": adapter_id}, files=files)


def _generate(client, **parameters) -> dict:
    r = client.post(
        "/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": N, "details": True, **parameters}},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _ids(answer: dict) -> list[int]:
    return [t["id"] for t in answer["details"]["tokens"]]


def test_peft_upload_generates_exactly_what_peft_generates(client, peft_dirs) -> None:
    _, (plain, want), (rs, want_rs) = peft_dirs
    base = _generate(client)
    assert _ids(base) != want  # the LoRA changes the answer
    r = _upload(client, "peft-plain", plain)
    assert r.status_code == 201, r.text
    again = _upload(client, "peft-plain", plain)  # the conversion is deterministic
    assert again.status_code == 200 and again.json()["status"] == "unchanged"
    assert _ids(_generate(client, adapter_id="peft-plain")) == want
    assert _upload(client, "peft-rs", rs).status_code == 201
    assert _ids(_generate(client, adapter_id="peft-rs")) == want_rs
    stored = client.get("/v1/adapters/peft-plain").json()["config"]
    assert stored["metadata"] == {"imported_from": "peft"}


def test_peft_options_without_an_exact_conversion_are_422(client, peft_dirs) -> None:
    plain = peft_dirs[1][0]
    config = json.loads((plain / "adapter_config.json").read_text())
    for patch, word in (
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"layer_replication": [[0, 4]]}, "layer_replication"),
    ):
        r = _upload(client, "bad", plain, json.dumps({**config, **patch}).encode())
        assert r.status_code == 422, r.text
        assert word in r.json()["error"]["message"]
    assert client.get("/v1/adapters/bad").status_code == 404


def test_peft_module_the_base_lacks_is_422(client, peft_dirs, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    plain = peft_dirs[1][0]
    tensors = load_file(plain / "adapter_model.safetensors")
    renamed = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.z_proj"): v
               for k, v in tensors.items()}  # fmt: skip
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(renamed, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_bytes((plain / "adapter_config.json").read_bytes())
    r = _upload(client, "bad", bad)
    assert r.status_code == 422 and "z_proj" in r.json()["error"]["message"], r.text


def test_vllm_load_and_unload_lora_adapter(client, peft_dirs, tmp_path) -> None:
    root, (plain, want), _ = peft_dirs
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(plain)})
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'vl' added successfully."
    again = client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(plain)})
    assert again.status_code == 400 and "already been loaded" in again.text
    r = client.post(
        "/v1/completions",
        json={"model": "vl", "prompt": PROMPT, "max_tokens": N, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    tok = _tokenizer()
    assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    # escapes: `..`, a symlink inside the allowed directory, a path outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    for path in (f"{root}/../{root.name}-x", str(root / "link"), str(outside), "/etc"):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "esc", "lora_path": path})
        assert r.status_code == 400 and "outside" in r.text, (path, r.text)
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert r.status_code == 200 and "removed" in r.text
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert r.status_code == 404 and "cannot be found" in r.text


def _tokenizer():
    from transformers import AutoTokenizer

    from flora import models as zoo

    return AutoTokenizer.from_pretrained(zoo.prepare(BASE))


def test_adapter_source_local_and_hub(client, peft_dirs) -> None:
    _, (plain, want), _ = peft_dirs
    answer = _generate(client, adapter_id=str(plain), adapter_source="local")
    assert _ids(answer) == want
    assert answer["details"]["adapter_id"].startswith("local-")
    r = client.post(
        "/generate",
        json={"inputs": PROMPT, "parameters": {"adapter_id": "org/x", "adapter_source": "hub"}},
    )
    assert r.status_code == 422 and "network" in r.text


def test_merged_adapters_linear_equals_peft_cat_merge(client, peft_dirs) -> None:
    """PEFT's add_weighted_adapter(combination_type="cat") is an exact weighted sum of the
    LoRA updates: the server's linear merge must generate what it generates."""
    from peft import PeftModel

    from flora import models as zoo

    _, (plain, _), (rs, _) = peft_dirs
    for name, path in (("m1", plain), ("m2", rs)):
        assert _upload(client, name, path).status_code in (200, 201)
    weights = [0.6, 1.5]
    model = PeftModel.from_pretrained(zoo.load(BASE).model, plain, adapter_name="m1")
    model.load_adapter(rs, adapter_name="m2")
    model.add_weighted_adapter(["m1", "m2"], weights, "mix", combination_type="cat")
    model.set_adapter("mix")
    tok = _tokenizer()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=N, do_sample=False)[0, ids.shape[1] :].tolist()
    merge = {"ids": ["m1", "m2"], "weights": weights, "merge_strategy": "linear"}
    first = _generate(client, merged_adapters=merge)
    assert _ids(first) == want
    derived = first["details"]["adapter_id"]
    assert derived.startswith("merge-")
    # cached: the same merge reuses the derived adapter; another weight makes a new one
    assert _generate(client, merged_adapters=merge)["details"]["adapter_id"] == derived
    other = {**merge, "weights": [0.6, 1.0]}
    assert _generate(client, merged_adapters=other)["details"]["adapter_id"] != derived
    ties = {**merge, "merge_strategy": "ties", "density": 0.5}
    assert _generate(client, merged_adapters=ties)["details"]["adapter_id"] != derived
    r = client.post(
        "/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"merged_adapters": {**merge, "ids": ["m1", "nope"]}},
        },
    )
    assert r.status_code == 404, r.text


def test_response_format_over_http(client) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    r = client.post(
        "/generate",
        json={
            "inputs": PROMPT,
            "parameters": {
                "max_new_tokens": 20,
                "response_format": {"type": "json_object", "schema": schema},
            },
        },
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)
    grammar = {"type": "regex", "value": "(Paris|Lyon), [0-9]{4}"}
    r = client.post(
        "/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "grammar": grammar}},
    )
    assert r.status_code == 200, r.text
    assert re.fullmatch("(Paris|Lyon), [0-9]{4}", r.json()["generated_text"]), r.text
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": BASE,
            "messages": [{"role": "user", "content": "Which city is the capital of France?"}],
            "max_tokens": 20,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": schema},
            },
        },
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    r = client.post(
        "/v1/completions",
        json={"model": BASE, "prompt": PROMPT, "max_tokens": 8,
              "response_format": {"type": "json_schema", "json_schema": {"name": "c"}}},
    )  # fmt: skip
    assert r.status_code == 422 and "schema" in r.text


def test_tool_calls_with_the_openai_client(client) -> None:
    """tool_choice "required" / a named function: the answer is a call whose arguments
    validate against the tool's parameters, parsed by the official client."""
    import jsonschema
    from openai import OpenAI

    params = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": params}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": params}}
    oai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    for choice, names in (
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ):
        out = oai.chat.completions.create(
            model=BASE,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[weather, clock],
            tool_choice=choice,
            max_tokens=60,
            temperature=0,
        )
        assert out.choices[0].finish_reason == "tool_calls"
        call = out.choices[0].message.tool_calls[0]
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), params)
