"""Prompt logprobs (TGI `decoder_input_details`, OpenAI `echo`) for engine v2, gathered
from the logits of the prefill chunks as they run.

v1 runs a scored prompt alone and keeps its [L, V] logits; here a prompt is prefilled in
chunks interleaved with other sequences, so each chunk asks the runner for the logits of
its positions that predict a prompt token (position p predicts token p + 1, for p in
0..L-2; the last prompt position's logits are the first generated token's, sampled as
usual), reduces them at once to the chosen logprob and the top-n, and drops them: at most
one chunk's [count, V] logits exist at a time.

A scored sequence never reads the prefix cache until its scores are complete (every prompt
position needs its logits; vLLM does the same), though the blocks it computes are cached
for others. A preemption during its prefill therefore recomputes from position 0, and the
positions are simply scored again, with the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flora_server.engine.protocol import Logprob
from flora_server.engine.sampling import chosen_and_top, prompt_logprob_entries


class PromptScores:
    """One sequence's prompt logprobs, filled chunk by chunk (positions in any order)."""

    def __init__(self, prompt_ids: Sequence[int], top_n: int, device: torch.device) -> None:
        self.prompt_ids = list(prompt_ids)
        self.top_n = top_n
        scored = len(self.prompt_ids) - 1  # positions 0..L-2 predict tokens 1..L-1
        k = max(top_n, 1)
        self._targets = torch.tensor(self.prompt_ids[1:], dtype=torch.long, device=device)
        self._chosen = torch.zeros(scored, dtype=torch.float32, device=device)
        self._values = torch.zeros(scored, k, dtype=torch.float32, device=device)
        self._ids = torch.zeros(scored, k, dtype=torch.long, device=device)
        self._done = torch.zeros(scored, dtype=torch.bool)

    def positions(self, start: int, count: int) -> range:
        """The positions of a chunk (`count` tokens from `start`) whose logits score a
        prompt token."""
        return range(start, min(start + count, len(self.prompt_ids) - 1))

    def add(self, start: int, logits: torch.Tensor) -> None:
        """logits: [m, V], raw, for positions start..start+m-1 (all within `positions`)."""
        end = start + logits.shape[0]
        chosen, values, ids = chosen_and_top(
            logits.float().log_softmax(-1), self._targets[start:end], self._values.shape[1]
        )
        self._chosen[start:end] = chosen
        self._values[start:end] = values
        self._ids[start:end] = ids
        self._done[start:end] = True

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def entries(self, decode: Callable[[list[int]], str]) -> tuple[Logprob, ...]:
        """What the client gets (the same entries v1 reports)."""
        return prompt_logprob_entries(
            self.prompt_ids,
            self._chosen.tolist(),
            self._values.tolist(),
            self._ids.tolist(),
            self.top_n,
            decode,
        )
