"""Chat-template tokenisation with the loss on the assistant's tokens only.

The conversation is rendered with the tokenizer's chat template one message at a time;
each new piece of text is tokenised on its own and concatenated, so the token ids of a
piece never depend on the next one. For an assistant message, the generation prompt
(e.g. ``<|im_start|>assistant\\n``) is context (label -100) and the rest (the answer and
its end-of-turn tokens) is trained. This needs a template whose rendering of a prefix of
the conversation is a prefix of the full rendering, which holds for the usual ChatML /
Llama templates; other templates get a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flora.train.data import Message
from flora.train.errors import DataError, TrainError

IGNORE = -100


@dataclass
class ChatTokens:
    """input_ids and labels (``IGNORE`` where no loss), same length."""

    input_ids: list[int]
    labels: list[int]


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _piece(full: str, prefix: str) -> str:
    if not full.startswith(prefix):
        raise TrainError("the chat template does not render conversations incrementally")
    return full[len(prefix) :]


def tokenize_chat(tokenizer: Any, messages: Sequence[Message], max_length: int) -> ChatTokens:
    """Token ids of the whole conversation and labels on assistant answers only.

    Truncated to ``max_length`` from the right; DataError if no answer token survives."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainError("the base's tokenizer has no chat template")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            context = _ids(tokenizer, _piece(prompt, done))
            ids += context
            labels += [IGNORE] * len(context)
            done = prompt
            full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
            answer = _ids(tokenizer, _piece(full, done))
            ids += answer
            labels += answer
        else:
            full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
            piece = _ids(tokenizer, _piece(full, done))
            ids += piece
            labels += [IGNORE] * len(piece)
        done = full
    ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE for lab in labels):
        raise DataError(f"a conversation has no answer tokens within --max-length {max_length}")
    return ChatTokens(ids, labels)


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Ids of everything before the last (assistant) message, plus the generation prompt:
    what the model sees at inference. Tokenised piece by piece like training."""
    ids: list[int] = []
    done = ""
    for i in range(len(messages) - 1):
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        ids += _ids(tokenizer, _piece(full, done))
        done = full
    prompt = _render(tokenizer, messages[:-1], generation_prompt=True)
    return ids + _ids(tokenizer, _piece(prompt, done))


def pad_right(rows: Sequence[ChatTokens], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch: input_ids / attention_mask / labels [B, T], right-padded (labels IGNORE)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_left(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts for batched generation: input_ids, attention_mask [B, T]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask
