"""Sanity checks of the embedded pretrained models (real weights, converted once).

Each model is loaded once per module; conversions are reused from the default FLORA_HOME
(the first SmolLM2 conversion takes about 25 s, later loads about 1.5 s).
"""

from __future__ import annotations

import pytest
import torch

import flora.models as fm
from flora.fingerprint import base_fingerprint

pytestmark = pytest.mark.integration

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def smollm2() -> fm.LoadedModel:
    return fm.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm() -> fm.LoadedModel:
    return fm.load("minilm-l6")


@pytest.fixture(scope="module")
def effnet() -> fm.LoadedModel:
    return fm.load("efficientnet-lite0")


def test_smollm2_answers_paris(smollm2):
    torch.manual_seed(0)
    tok = smollm2.preprocessor
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = smollm2.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert smollm2.kind == "causal-lm"
    assert smollm2.context_length == 8192
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008


def test_smollm2_fingerprint_is_of_the_fp32_files_and_dtype_independent(smollm2):
    assert smollm2.fingerprint == base_fingerprint(smollm2.model)  # loaded in fp32
    assert smollm2.source_path.name == "model.safetensors" and smollm2.source_path.is_file()
    bf16 = fm.load("smollm2-135m-instruct", dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.fingerprint == smollm2.fingerprint
    # The file omits the tied lm_head; the canonical state dict puts it back.
    canonical = fm.canonical_state_dict(bf16)
    assert "lm_head.weight" in canonical and canonical["lm_head.weight"].dtype == torch.float32
    assert base_fingerprint(canonical) == smollm2.fingerprint


def test_second_prepare_does_not_reconvert(smollm2):
    directory = fm.prepare("smollm2-135m-instruct")
    assert smollm2.source_path.parent == directory
    watched = ["model.safetensors", "flora_model.json", "fingerprint.json"]
    before = {n: (directory / n).stat().st_mtime_ns for n in watched}
    assert fm.prepare("smollm2-135m-instruct") == directory
    assert {n: (directory / n).stat().st_mtime_ns for n in watched} == before


def test_efficientnet_sees_a_cat(effnet):
    from PIL import Image
    from skimage.data import chelsea

    x = effnet.preprocessor(Image.fromarray(chelsea())).unsqueeze(0)
    with torch.inference_mode():
        probs = effnet.model(x).softmax(-1)[0]
    top1 = int(probs.argmax())
    assert top1 in CAT_CLASSES, (top1, effnet.labels[top1])
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8
    assert effnet.labels[281] == "tabby, tabby cat" and len(effnet.labels) == 1000
    assert effnet.kind == "image-classifier" and effnet.preprocessor.size == 224
    assert effnet.fingerprint == base_fingerprint(effnet.model)


def test_minilm_paraphrase_closer_than_unrelated(minilm):
    texts = [
        "A man is playing a guitar.",
        "Someone is playing an instrument, a guitar.",
        "The stock market fell sharply on Tuesday.",
    ]
    emb = fm.encode(minilm, texts)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert paraphrase > 0.6 > 0.2 > unrelated
    # Batched (padded) and one-by-one encodings agree: padding is masked out.
    one_by_one = torch.cat([fm.encode(minilm, [t]) for t in texts])
    torch.testing.assert_close(emb, one_by_one, atol=1e-5, rtol=1e-5)
    assert minilm.context_length == 256 and minilm.pooling == fm.Pooling("mean", True)


def test_smollm2_streamed_text_equals_its_full_decode(smollm2):
    """Incremental detokenisation (`engine/text.py`) with the real byte-level BPE: every
    piece released in order is the full decode, accents, emoji and spaces included."""
    from flora_server.engine.text import TextStream

    tok = smollm2.preprocessor
    ids = tok.encode("Ça coûte 3 €, dit-il 😀 — naïve  spaces\n\tand 日本語 text.")

    def decode(chunk: list[int]) -> str:
        return tok.decode(chunk, skip_special_tokens=True)

    stream = TextStream(decode)
    pieces = [stream.push(t) for t in ids] + [stream.push(None, final=True)]
    assert "".join(pieces) == decode(ids)
    assert sum(1 for p in pieces if p) > len(ids) // 2  # released as it goes, not at the end
