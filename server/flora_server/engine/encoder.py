"""`EncoderEngine`: sentence embeddings and text classification with many adapters at once.

One forward per batch: texts are tokenized together (padded, truncated to the context
length), linear/embedding layers route rows per adapter (`flora.serving`), token states are
pooled as the base defines (`flora.models.pool`: masked mean, L2-normalised for MiniLM):

    e_i = normalize( sum_t m_it h_it / max(sum_t m_it, eps) )

Classification requests additionally run the adapter's own head on the pooled vector of
its rows (`engine/heads.py`); an adapter's metadata may name another pooling
(`{"pooling": {"mode": "mean", "normalize": false}}`) for its head input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from flora.models.text_encoder import pool
from flora.models.types import Pooling, PoolingMode
from flora.serving.model import ServingModel
from flora_server.engine.batch_engine import BatchEngine, BatchJob
from flora_server.engine.heads import HeadedRuntime, apply_heads
from flora_server.engine.protocol import AdapterLoadError, AdapterSource, InvalidRequestError
from flora_server.engine.runtime import torch_factor_dtype
from flora_server.engine.vision import top_predictions


@dataclass(frozen=True)
class EncoderOptions:
    task: Literal["embed", "classify"] = "embed"
    top_k: int = 5


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: torch.Tensor  # [n, D] fp32 on the CPU
    tokens: int


POOLING_MODES: tuple[PoolingMode, ...] = get_args(PoolingMode)


def head_pooling(base: Pooling, metadata: dict[str, Any]) -> Pooling:
    """The pooling an adapter's head was trained on (metadata `pooling`: `{"mode": "mean"
    or "cls", "normalize": true or false}`, either key may be left out), else the base's.

    Raises ValueError naming the field for anything else (run at upload through
    `EncoderEngine.check_adapter`, so a bad value is a 422 there, not other scores)."""
    saved = metadata.get("pooling")
    if saved is None:
        return base
    if not isinstance(saved, dict):
        raise ValueError(f"metadata.pooling must be an object, got {type(saved).__name__}")
    unknown = sorted(set(saved) - {"mode", "normalize"})
    if unknown:
        raise ValueError(f"metadata.pooling has unknown fields {unknown} (mode, normalize)")
    mode = saved.get("mode", base.mode)
    if mode not in POOLING_MODES:
        raise ValueError(
            f"metadata.pooling.mode {mode!r} is not a pooling mode ({', '.join(POOLING_MODES)})"
        )
    normalize = saved.get("normalize", base.normalize)
    if not isinstance(normalize, bool):
        raise ValueError(f"metadata.pooling.normalize must be true or false, got {normalize!r}")
    return Pooling(mode=mode, normalize=normalize)


class EncoderEngine(BatchEngine):
    """`BatchEngine` over a `LoadedModel` of kind "text-encoder". Requests: `inputs` are
    strings; `options` an `EncoderOptions`. Results: `EmbeddingResult` for "embed", one list
    of `Prediction` per text for "classify"."""

    kind = "text-encoder"

    def __init__(
        self,
        loaded: Any,
        source: AdapterSource,
        *,
        max_slots: int = 8,
        factor_dtype: str = "auto",
        **kwargs: Any,
    ) -> None:
        self.model = loaded.model.eval()
        self.tokenizer = loaded.preprocessor
        self.pooling: Pooling = loaded.pooling or Pooling()
        hidden = int(self.model.config.hidden_size)
        serving = ServingModel(
            self.model, max_slots=max_slots, factor_dtype=torch_factor_dtype(factor_dtype)
        )
        self.device = serving.device
        super().__init__(
            model_name=loaded.name,
            runtime=HeadedRuntime(serving, hidden),
            source=source,
            max_slots=max_slots,
            context_length=int(loaded.context_length or 512),
            **kwargs,
        )
        self.heads: HeadedRuntime = self.runtime  # type: ignore[assignment]

    def warm_up(self) -> None:
        self._encode(["warm up"], [None])

    def check_adapter(self, adapter: Any) -> None:
        """`BatchEngine.check_adapter`, and the head's pooling (`head_pooling`) must be one
        this engine computes, so a bad one is a 422 at upload."""
        super().check_adapter(adapter)
        head_pooling(self.pooling, adapter.metadata)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model will see for `texts` (after truncation)."""
        enc = self.tokenizer(texts, truncation=True, max_length=self.context_length)
        return sum(len(ids) for ids in enc["input_ids"])

    def _encode(
        self, texts: list[str], slots: list[int | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        ).to(self.device)
        self.heads.set_routing(slots)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state, batch["attention_mask"]  # [B, T, D], [B, T]

    def run_batch(self, jobs: list[BatchJob]) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        live: list[int] = []
        for j, job in enumerate(jobs):
            options: EncoderOptions = job.options or EncoderOptions()
            info = self.heads.info(job.slot)
            if options.task == "classify" and (info is None or info.head is None):
                who = f"adapter {job.adapter_id!r}" if job.adapter_id else "the base model"
                results[j] = InvalidRequestError(
                    f"{who} has no classification head; name an adapter trained with one",
                    param="adapter_id",
                )
            else:
                live.append(j)
        if not live:
            return results
        texts = [t for j in live for t in jobs[j].inputs]
        slots = [jobs[j].slot for j in live for _ in jobs[j].inputs]
        hidden, mask = self._encode(texts, slots)
        start = 0
        for j in live:
            job, n = jobs[j], len(jobs[j].inputs)
            h, m = hidden[start : start + n], mask[start : start + n]
            start += n
            options = job.options or EncoderOptions()
            if options.task == "embed":
                vectors = pool(h, m, self.pooling).cpu()
                results[j] = EmbeddingResult(vectors, int(m.sum()))
                continue
            info = self.heads.info(job.slot)
            assert info is not None and info.head is not None
            try:  # stored before uploads checked it: that adapter's requests fail alone
                pooling = head_pooling(self.pooling, info.metadata)
            except ValueError as exc:
                results[j] = AdapterLoadError(f"adapter {job.adapter_id!r}: {exc}")
                continue
            features = pool(h, m, pooling)
            logits = apply_heads(
                features.to(info.head.weight.dtype), [job.slot] * n, {job.slot: info.head}
            )
            results[j] = [top_predictions(row, info.head.labels, options.top_k) for row in logits]
        return results
