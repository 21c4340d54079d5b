"""The running batch: a row's greedy tokens must not depend on what else is in the batch."""

from __future__ import annotations

import torch

from flora_server.engine.causal_batch import (
    CausalBatch,
    leading_padding,
    left_pad,
    positions_from_mask,
)


def greedy_alone(model, prompt: list[int], steps: int) -> list[int]:
    """Reference: plain full-sequence forward passes, no cache, no padding."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
    return out


def run_continuous(model, prompts: list[list[int]], joins: list[int], steps: int):
    """Prompt i joins the running batch before decode step joins[i]; returns each row's
    greedy tokens (steps tokens per row); rows leave as they finish."""
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    batch = None
    step = 0
    while step < max(joins) + steps + 1:
        new = [i for i, j in enumerate(joins) if j == step]
        if new:
            nb, logits = CausalBatch.prefill(model, [prompts[i] for i in new], new)
            tokens = logits.argmax(-1)
            nb.next_tokens = tokens
            for r, t in zip(new, tokens.tolist(), strict=True):
                outputs[r].append(t)
            batch = nb if batch is None else CausalBatch.concatenate([batch, nb])
        if batch is not None:
            keep = [k for k, r in enumerate(batch.rows) if len(outputs[r]) < steps]
            if len(keep) < len(batch):
                if keep:
                    batch.filter(keep)
                else:
                    batch = None
        if batch is not None:
            logits = batch.decode(model)
            tokens = logits.argmax(-1)
            batch.next_tokens = tokens
            for r, t in zip(batch.rows, tokens.tolist(), strict=True):
                outputs[r].append(t)
        step += 1
    return outputs


def test_left_pad_and_positions() -> None:
    ids, mask = left_pad([[5, 6, 7], [9]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert leading_padding(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])) == 1
    assert leading_padding(torch.tensor([[0, 1], [1, 1]])) == 0


def test_rows_join_and_leave_exact_tokens(tiny_model) -> None:
    torch.manual_seed(1)
    prompts = [torch.randint(3, 98, (n,)).tolist() for n in (7, 3, 12, 1, 5)]
    joins = [0, 0, 2, 3, 6]
    steps = 9
    got = run_continuous(tiny_model, prompts, joins, steps)
    for i, prompt in enumerate(prompts):
        assert got[i][:steps] == greedy_alone(tiny_model, prompt, steps), f"row {i}"


def test_filter_trims_padding_columns(tiny_model) -> None:
    batch, _ = CausalBatch.prefill(tiny_model, [[5] * 10, [6, 7]], ["long", "short"])
    assert batch.kv_length == 10
    batch.filter([1])
    assert batch.rows == ["short"]
    assert batch.kv_length == 2
    assert batch.cache.layers[0].keys.shape[2] == 2
    assert batch.next_positions.tolist() == [2]
