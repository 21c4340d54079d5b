"""Recipe ``causal-lm``: supervised fine-tuning of a chat LLM with FLoRA adapters.

Data: JSONL of ``{"messages": [...]}`` or ``{"prompt", "completion"}``, or
``builtin:synthetic-instruct``. Text goes through the tokenizer's chat template and the
loss is the mean cross-entropy over the assistant's answer tokens only
(:mod:`flora.train.chat_tokens`).

Evaluation: ``eval_exact_match``, the fraction of held-out conversations for which greedy
decoding from the prompt reproduces the reference answer exactly (after stripping
surrounding whitespace), and ``eval_loss`` on the answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flora.config import FloraConfig
from flora.injection import inject
from flora.models.types import LoadedModel, a_kind
from flora.train.batches import eval_chunks
from flora.train.chat_tokens import ChatTokens, pad_left, pad_right, prompt_ids, tokenize_chat
from flora.train.device import to_device
from flora.train.errors import TrainError
from flora.train.options import RecipeDefaults, TrainOptions
from flora.train.recipe import Batch, TrainTask
from flora.train.sources import chat_data

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GEN_BATCH = 25
EXTRA_NEW_TOKENS = 8  # generate a little past the reference length, to see overruns


class CausalLMRecipe:
    """Chat SFT with the loss on answer tokens."""

    name = "causal-lm"
    description = "JSONL chat / prompt,completion / builtin:synthetic-instruct -> SFT adapter"
    defaults = RecipeDefaults(
        targets=DEFAULT_TARGETS, lr=2e-3, batch_size=8, epochs=1.0, scale=1.0, eval_limit=100
    )

    def prepare(self, options: TrainOptions, loaded: LoadedModel) -> TrainTask:
        if loaded.kind != "causal-lm":
            raise TrainError(f"{loaded.name} is {a_kind(loaded.kind)}; causal-lm needs a causal LM")
        tokenizer = loaded.preprocessor
        train_chats, eval_chats = chat_data(options)
        max_length = min(options.max_length, loaded.context_length or options.max_length)
        train = [tokenize_chat(tokenizer, c, max_length) for c in train_chats]
        eval_ = [
            (tokenize_chat(tokenizer, c, max_length), prompt_ids(tokenizer, c), c[-1]["content"])
            for c in eval_chats
        ]
        model = loaded.model
        targets = options.targets
        assert targets is not None and options.scale is not None  # resolved options
        config = FloraConfig(target_modules=targets, rank=options.rank, scale=options.scale)
        try:
            inject(model, config)
        except ValueError as exc:
            raise TrainError(f"--targets: {exc}") from None
        pad_id = _pad_id(tokenizer)
        device = torch.device(options.device)

        def collate(examples: list[ChatTokens]) -> Batch:
            return to_device(pad_right(examples, pad_id), device)

        def evaluate(m: nn.Module, examples: Sequence[Any]) -> dict[str, float]:
            return evaluate_chats(m, tokenizer, examples, pad_id, options.progress)

        return TrainTask(
            model=model,
            base_model_id=loaded.name,
            task=self.name,
            labels=None,
            train_examples=train,
            eval_examples=eval_,
            collate=collate,
            loss=lm_loss,
            evaluate=evaluate,
            train_mode=lambda m: m.train(),
            # exact match moves in steps of 1/N and sits at 0 early on; the answer loss
            # is smooth, so it picks the best adapter more reliably
            best_metric=("eval_loss", False),
        )


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise TrainError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    return out.loss


def greedy_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int
) -> list[str]:
    """Greedy continuations of left-padded ``prompts``, decoded without special tokens."""
    ids, mask = pad_left(prompts, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = model.generate(  # type: ignore[operator]  # a transformers model: nn.Module has no generate
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def evaluate_chats(
    model: nn.Module, tokenizer: Any, examples: Sequence[Any], pad_id: int, progress: bool = False
) -> dict[str, float]:
    """``eval_exact_match`` (greedy answer == reference, stripped) and ``eval_loss``."""
    hits, loss_sum, n_tokens = 0, 0.0, 0
    device = next(model.parameters()).device
    for chunk in eval_chunks(examples, GEN_BATCH, progress):
        batch = to_device(pad_right([tok for tok, _, _ in chunk], pad_id), device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(lm_loss(model, batch)) * n
        n_tokens += n
        longest = max(sum(1 for lab in tok.labels if lab != -100) for tok, _, _ in chunk)
        answers = greedy_answers(
            model, tokenizer, [p for _, p, _ in chunk], longest + EXTRA_NEW_TOKENS, pad_id
        )
        hits += sum(a.strip() == ref.strip() for a, (_, _, ref) in zip(answers, chunk, strict=True))
    return {"eval_exact_match": hits / len(examples), "eval_loss": loss_sum / max(n_tokens, 1)}
