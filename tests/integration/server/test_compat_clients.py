"""The official clients against one real `flora-serve` on SmolLM2-135M: `lorax-client`,
`text-generation` (TGI's client), `huggingface_hub.InferenceClient` and `openai`.

One server for the whole module (started once, `--served-model-name smollm2`) and one small
FLoRA adapter made here with flora (random non-zero cores on q_proj/v_proj, so it changes
greedy output) and uploaded over HTTP. Every client must get the same greedy text for the
same adapter and prompt, different from the base's; errors must arrive as each client's
own typed exception.
"""

from __future__ import annotations

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
