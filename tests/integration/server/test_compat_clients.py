"""The official clients against one real `flora-serve` on SmolLM2-135M: `lorax-client`,
`text-generation` (TGI's client), `huggingface_hub.InferenceClient` and `openai`.

One server for the whole module (started once, `--served-model-name smollm2`) and one small
FLoRA adapter made here with flora (random non-zero cores on q_proj/v_proj, so it changes
greedy output) and uploaded over HTTP. Every client must get the same greedy text for the
same adapter and prompt, different from the base's; errors must arrive as each client's
own typed exception.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_process import T, running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

lorax = pytest.importorskip("lorax")
text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")
hub = pytest.importorskip("huggingface_hub")

BASE = "smollm2-135m-instruct"
NAME = "smollm2"  # --served-model-name
PROMPT = "The capital of France is"
N = 8


def _make_adapter(out: Path) -> Path:
    import torch

    from flora import FloraConfig, adapter_layers, inject
    from flora import models as zoo
    from flora.adapter import save_adapter

    model = inject(zoo.load(BASE).model, FloraConfig(target_modules=["q_proj", "v_proj"], rank=4))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.core.normal_(0.0, 0.5)
    return Path(save_adapter(model, out, base_model_id=BASE))


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from flora_client import Client

    work = tmp_path_factory.mktemp("compat")
    adapter = _make_adapter(work / "alpha")
    args = ["--model", BASE, "--served-model-name", NAME, "--adapter-store", str(work / "store")]
    with running_server([*args, "--max-new-tokens", "64"]) as server_url:
        with Client(server_url, timeout=T) as client:
            assert client.adapters.upload(adapter, "alpha").status == "created"
        yield server_url


@pytest.fixture(scope="module")
def reference(url: str) -> dict[str | None, str]:
    """Greedy text of the flora SDK's /generate, for the adapter and for the base."""
    from flora_client import Client

    with Client(url, timeout=T) as client:
        return {
            a: client.generate(PROMPT, a, max_new_tokens=N).generated_text for a in ("alpha", None)
        }


def test_adapter_changes_the_text(reference: dict[str | None, str]) -> None:
    assert reference["alpha"] != reference[None]
    assert reference["alpha"] and reference[None]


def test_lorax_client_generate_and_stream_with_adapter(url: str, reference) -> None:
    client = lorax.Client(url, timeout=T)
    out = client.generate(
        PROMPT, adapter_id="alpha", max_new_tokens=N, details=True, decoder_input_details=True
    )
    assert out.generated_text == reference["alpha"]
    assert out.details.finish_reason in ("length", "eos_token")
    assert out.details.generated_tokens == len(out.details.tokens) <= N
    assert all(t.logprob <= 0 for t in out.details.tokens)
    assert out.details.prefill[0].logprob is None and len(out.details.prefill) > 1
    events = list(client.generate_stream(PROMPT, adapter_id="alpha", max_new_tokens=N))
    text = "".join(e.token.text for e in events if not e.token.special)
    assert text == events[-1].generated_text == reference["alpha"]
    assert all(isinstance(e.token.logprob, float) for e in events)
    with pytest.raises(lorax.errors.NotFoundError):
        client.generate(PROMPT, adapter_id="missing", max_new_tokens=2)
    with pytest.raises(lorax.errors.ValidationError):
        client.generate(PROMPT, max_new_tokens=100_000)


def test_text_generation_client(url: str, reference) -> None:
    client = text_generation.Client(url, timeout=T)
    out = client.generate(PROMPT, max_new_tokens=N, top_n_tokens=2)
    assert out.generated_text == reference[None]
    # Greedy: each token is the first of its position's top tokens, with the same logprob.
    for token, top in zip(out.details.tokens, out.details.top_tokens, strict=True):
        assert top[0].id == token.id and top[0].logprob == pytest.approx(token.logprob)
        assert top[1].logprob <= top[0].logprob
    events = list(client.generate_stream(PROMPT, max_new_tokens=N))
    assert events[-1].generated_text == reference[None]
    with pytest.raises(text_generation.errors.ValidationError):
        client.generate(PROMPT, max_new_tokens=100_000)


def test_huggingface_hub_inference_client(url: str, reference) -> None:
    client = hub.InferenceClient(model=url, timeout=T)
    text = client.text_generation(PROMPT, adapter_id="alpha", max_new_tokens=N)
    assert text == reference["alpha"]
    pieces = client.text_generation(PROMPT, adapter_id="alpha", max_new_tokens=N, stream=True)
    assert "".join(pieces) == reference["alpha"]
    # get_endpoint_info reads /info only under the "hf-inference" provider's name.
    info = hub.InferenceClient(model=url, provider="hf-inference", timeout=T).get_endpoint_info()
    assert info["model_id"] == NAME and info["max_total_tokens"] > info["max_input_tokens"] > 0
    with pytest.raises(hub.errors.ValidationError):
        client.text_generation(PROMPT, max_new_tokens=100_000)


def test_openai_client(url: str, reference) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=T, max_retries=0)
    for model in ("alpha", f"{NAME}:alpha"):
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
        assert out.choices[0].text == reference["alpha"], model
    chunks = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="missing", prompt=PROMPT, max_tokens=2)
    assert missing.value.code == "model_not_found"
    context = httpx.get(f"{url}/info", timeout=T).json()["max_total_tokens"]
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=NAME, prompt="hi " * (context + 10), max_tokens=2)
    assert long.value.code == "context_length_exceeded"
    assert f"maximum context length is {context} tokens" in long.value.message


def test_echo_logprobs_match_tgi_prefill(url: str) -> None:
    """lm-eval's log-likelihood request (echo + logprobs, token-id prompt) scores the prompt
    exactly as TGI's decoder_input_details does."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=T, max_retries=0)
    tgi = lorax.Client(url, timeout=T).generate(
        PROMPT, max_new_tokens=1, details=True, decoder_input_details=True
    )
    ids = [t.id for t in tgi.details.prefill]
    out = client.completions.create(
        model=NAME, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None
    expected = [t.logprob for t in tgi.details.prefill[1:]]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    # is_greedy as lm-eval computes it: the token's logprob is its position's maximum.
    for token_lp, top in zip(lp.token_logprobs[1 : len(ids)], lp.top_logprobs[1:], strict=False):
        assert token_lp <= max(top.values()) + 1e-6


# Token texts: each token's own text (as vLLM's logprobs and TGI's `token.text` give it),
# checked against the tokenizer's own decode, where text is held back for a stop sequence.


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from flora import models as zoo

    return zoo.load(BASE).preprocessor


def _sse(url: str, route: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{route}", json=body, timeout=T) as r:
        assert r.status_code == 200, r.read()
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def _chat_prompt(tokenizer, content: str) -> str:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_completion_logprob_tokens_are_their_own_text_with_a_stop_held_back(
    url: str, tokenizer
) -> None:
    """ " Paris", ".", "\\n", "\\n", "The", ...: the newlines could start the stop sequence
    "\\n\\nX", so their text goes out with "The"; `tokens`, `top_logprobs` keys and
    `text_offset` still describe each token, and a stream reports the same."""
    stop = ["\n\nX"]
    tgi = httpx.post(
        f"{url}/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": 6, "stop": stop, "top_n_tokens": 2},
        },
        timeout=T,
    ).json()
    ids = [t["id"] for t in tgi["details"]["tokens"]]
    own = [tokenizer.decode([i]) for i in ids]
    assert own[2:4] == ["\n", "\n"] and tgi["details"]["finish_reason"] == "length"
    assert [t["text"] for t in tgi["details"]["tokens"]] == own
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    out = httpx.post(f"{url}/v1/completions", json={**body, "stop": stop}, timeout=T).json()
    choice = out["choices"][0]
    assert choice["text"] == tgi["generated_text"] == "".join(own)
    lp = choice["logprobs"]
    assert lp["tokens"] == own
    assert lp["text_offset"] == [len("".join(own[:i])) for i in range(len(own))]
    tops = zip(lp["top_logprobs"], tgi["details"]["top_tokens"], strict=True)
    for i, (entry, top) in enumerate(tops):
        want = {tokenizer.decode([t["id"]]): t["logprob"] for t in top}
        want.setdefault(own[i], lp["token_logprobs"][i])
        assert entry == pytest.approx(want, abs=1e-4), i
    chunks = _sse(url, "/v1/completions", {**body, "stop": stop, "stream": True})
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    for key in ("tokens", "text_offset"):
        assert [x for s in streamed for x in s[key]] == lp[key], key
    got = [x for s in streamed for x in s["token_logprobs"]]
    assert got == pytest.approx(lp["token_logprobs"], abs=1e-4)
    got_top = [x for s in streamed for x in s["top_logprobs"]]
    assert len(got_top) == len(lp["top_logprobs"])
    for entry, want_entry in zip(got_top, lp["top_logprobs"], strict=True):
        assert entry == pytest.approx(want_entry, abs=1e-4)


def test_tgi_stream_token_texts_rebuild_the_text_when_eos_releases_it(url: str, tokenizer) -> None:
    """The "?" before EOS is held back (it could start "?☃") and released at EOS: it is the
    "?" token's text, EOS has none, and the non-special tokens' texts concatenate to
    `generated_text` as TGI's clients rebuild it, streamed or not."""
    body = {"inputs": _chat_prompt(tokenizer, "Hi"), "parameters": {"max_new_tokens": 16}}
    body["parameters"]["stop"] = ["?☃"]
    full = httpx.post(f"{url}/generate", json=body, timeout=T).json()
    assert full["details"]["finish_reason"] == "eos_token"
    assert full["generated_text"].endswith("?")
    events = _sse(url, "/generate_stream", body)
    for tokens in ([e["token"] for e in events], full["details"]["tokens"]):
        assert tokens[-1]["special"] and tokens[-1]["text"] == ""
        assert tokens[-1]["id"] == tokenizer.eos_token_id
        assert tokens[-2]["text"] == "?"
        assert [t["text"] for t in tokens[:-1]] == [
            tokenizer.decode([t["id"]]) for t in tokens[:-1]
        ]
        text = "".join(t["text"] for t in tokens if not t["special"])
        assert text == full["generated_text"] == events[-1]["generated_text"]


def test_echo_of_token_ids_is_the_prompt_decoded_whole(url: str, tokenizer) -> None:
    """Token ids that split emoji over several tokens come back as the prompt decoded at
    once; each token's text is what it adds to it ("" inside a character, the character
    on the token completing it), and `text_offset` points at it in the text."""
    ids = [10809, 33777, 40303, 218, 10813, 232, 227, 37366]
    whole = tokenizer.decode(ids)
    assert whole == "Emoji 😀🎉 café"

    def complete(n: int) -> str:  # the longest ids[:m], m <= n, decoding to whole characters
        while n and tokenizer.decode(ids[:n]).endswith("\ufffd"):
            n -= 1
        return tokenizer.decode(ids[:n])

    own = [complete(i + 1)[len(complete(i)) :] for i in range(len(ids))]
    body = {"model": NAME, "prompt": ids, "max_tokens": 0, "echo": True}
    assert (
        httpx.post(f"{url}/v1/completions", json=body, timeout=T).json()["choices"][0]["text"]
        == whole
    )
    out = httpx.post(f"{url}/v1/completions", json={**body, "logprobs": 1}, timeout=T).json()
    choice = out["choices"][0]
    assert choice["text"] == whole
    lp = choice["logprobs"]
    assert lp["tokens"] == own and "".join(own) == whole
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert whole[offset : offset + len(token)] == token
    assert lp["text_offset"] == [len("".join(own[:i])) for i in range(len(own))]
    assert all(len(entry) <= 2 for entry in lp["top_logprobs"][1:])  # 1 alternative + itself


def test_chat_logprobs_streamed_equal_non_streamed_eos_included(url: str, tokenizer) -> None:
    """Every generated token has an entry in both, EOS too (as vLLM reports it; it counts
    in `completion_tokens`) with no text, and each token's text and bytes are its own while
    the content that goes with it is held back for a stop sequence."""
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "stop": ["?☃"],
    }
    tgi = httpx.post(
        f"{url}/generate",
        json={"inputs": _chat_prompt(tokenizer, "Hi"), "parameters": {"max_new_tokens": 16}},
        timeout=T,
    ).json()
    ids = [t["id"] for t in tgi["details"]["tokens"]]
    full = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=T).json()
    choice = full["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == full["usage"]["completion_tokens"] == len(ids)
    own = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    assert [c["token"] for c in content] == own and own[-1] == "" and own[-2] == "?"
    assert [c["bytes"] for c in content] == [list(t.encode()) for t in own]
    assert choice["message"]["content"] == "".join(own) == tgi["generated_text"]
    chunks = [
        c["choices"][0]
        for c in _sse(url, "/v1/chat/completions", {**body, "stream": True})
        if c["choices"]
    ]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == choice["message"]["content"]
    streamed = [x for c in chunks if c["logprobs"] for x in c["logprobs"]["content"]]
    assert [(s["token"], s["bytes"]) for s in streamed] == [
        (c["token"], c["bytes"]) for c in content
    ]
    assert [s["logprob"] for s in streamed] == pytest.approx(
        [c["logprob"] for c in content], abs=1e-4
    )
