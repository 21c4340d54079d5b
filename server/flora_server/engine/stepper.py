"""One iteration of continuous batching, run on the worker thread.

`Stepper` owns the running `CausalBatch` and applies the mode decision: it merges or
unmerges through the runtime, sets the per-row routing, decodes the running rows, prefills
the admitted ones, samples, emits events and drops finished rows. The worker thread
(`llm_engine.LLMEngine`) does the queueing around it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from flora_server.engine.adapter_cache import AdapterCache
from flora_server.engine.causal_batch import CausalBatch
from flora_server.engine.hooks import EngineMetrics
from flora_server.engine.policy import (
    Mode,
    ModeDecision,
    choose_mode,
    merge_pays,
    update_streak,
)
from flora_server.engine.protocol import (
    EngineError,
    FinishEvent,
    FinishReason,
    Logprob,
    RequestFailedError,
    TokenEvent,
)
from flora_server.engine.requests import RowState
from flora_server.engine.runtime import AdapterRuntime
from flora_server.engine.sampling import (
    SamplingTensors,
    chosen_and_top,
    prompt_logprob_entries,
    prompt_logprobs,
    sample_tokens,
    seen_mask,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Stepper:
    def __init__(
        self,
        model: PreTrainedModel,
        runtime: AdapterRuntime,
        cache: AdapterCache,
        eos_ids: set[int],
        metrics: EngineMetrics,
        merge_after_steps: int | None,
    ) -> None:
        self.model = model
        self.runtime = runtime
        self.cache = cache
        self.eos_ids = eos_ids
        self.metrics = metrics
        self.merge_after_steps = merge_after_steps
        self.batch: CausalBatch | None = None
        self.mode: Mode = "idle"
        self._streak_slot: int | None = None
        self._streak = 0
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    @property
    def busy(self) -> bool:
        """Whether any request is in the engine's hands (a step is due)."""
        return self.batch is not None

    @property
    def rows(self) -> list[RowState]:
        return [] if self.batch is None else list(self.batch.rows)

    def step(self, admitted: Sequence[RowState], waiting: Sequence[str | None]) -> None:
        """Decode the running rows, prefill `admitted`, then drop finished rows."""
        self._decide_mode([*self.rows, *admitted], waiting)
        if self.batch is not None:
            self._decode()
        if admitted:
            try:
                self._prefill(list(admitted))
            except Exception as exc:
                self._prefill_one_by_one(admitted, exc)
        self.drop_finished()

    def _prefill_one_by_one(self, admitted: Sequence[RowState], exc: Exception) -> None:
        """A batched prefill failed (out of memory, a bad prompt): retry each row alone so
        the failure stays with the request that causes it, not its batch neighbours."""
        if len(admitted) == 1:
            self.fail(list(admitted), exc)
            return
        for row in admitted:
            if row.finished is not None or row.generated:
                continue  # already answered before the failure: never emit twice
            try:
                self._prefill([row])
            except Exception as row_exc:
                self.fail([row], row_exc)

    def _decide_mode(self, rows: Sequence[RowState], waiting: Sequence[str | None]) -> None:
        """The policy's mode for a step over `rows` (engine/policy.py), merging or
        unmerging as it says; `waiting`: the adapter ids of the requests not yet admitted.

        The policy sees each row's slot, not its adapter id: a slot is one loaded copy,
        and after an overwrite the old copy serves the rows admitted before it while the
        new one serves later rows under the same id. The merged slot is the runtime's
        (the cache unmerges a slot it unloads)."""
        running = [r.slot for r in rows]
        self._streak_slot, self._streak = update_streak(self._streak_slot, self._streak, running)
        decision: ModeDecision[int | str] = choose_mode(
            running,
            [self._copy_for(adapter_id) for adapter_id in waiting],
            self.runtime.merged_slot,
            self._streak,
            merge_after_steps=self.merge_after_steps,
            pays=lambda slot: self._merge_pays(slot, rows),
        )
        merge = decision.merge  # a running row's slot or the merged one: never a waiting id
        self._set_merged(merge if isinstance(merge, int) else None)
        self.mode = decision.mode

    def _copy_for(self, adapter_id: str | None) -> int | str | None:
        """The loaded copy a waiting request for `adapter_id` would read once admitted:
        the slot holding that id's current bytes, else the id itself (a copy not on the
        device yet, which no running row reads)."""
        if adapter_id is None:
            return None
        slot = self.cache.current_slot(adapter_id)
        return adapter_id if slot is None else slot

    def _merge_pays(self, slot: int | str, rows: Sequence[RowState]) -> bool:
        """Policy rule 4c for the adapter on `slot`, which every row of `rows` uses."""
        assert isinstance(slot, int)  # running rows are keyed by their slots
        remaining = [r.handle.max_new_tokens - len(r.generated) for r in rows]
        return merge_pays(remaining, self.runtime.merge_cost(slot))

    def _set_merged(self, slot: int | None) -> None:
        """Fold the adapter on `slot` into the weights (None: none), unmerging first."""
        old = self.runtime.merged_slot
        if slot == old:
            return
        name = self.cache.slot_adapter
        old_name = None if old is None else name(old)
        if slot is None:
            self.runtime.unmerge()
        else:
            self.runtime.merge(slot)
        self.metrics.on_mode_switch(old_name, None if slot is None else name(slot))

    @staticmethod
    def _routing(rows: Sequence[RowState]) -> list[int | None]:
        # In merged mode every row names the merged slot; the runtime then runs them on
        # the base path (the adapter already lives in the weights).
        return [r.slot for r in rows]

    def _decode(self) -> None:
        assert self.batch is not None
        started = time.monotonic()
        self.runtime.set_routing(self._routing(self.batch.rows))
        logits = self.batch.decode(self.model)
        tokens = self._sample(self.batch.rows, logits)
        self.batch.next_tokens = tokens
        self.metrics.on_step(self.mode, len(self.batch), time.monotonic() - started)
        self.metrics.on_tokens(len(self.batch))

    def _prefill(self, rows: list[RowState]) -> None:
        # Prompt logprobs need every position's logits: such rows run alone, so at most
        # one [L, V] block is held at a time.
        plain = [r for r in rows if not r.request.params.prompt_logprobs]
        scored = [[r] for r in rows if r.request.params.prompt_logprobs]
        for group in ([plain] if plain else []) + scored:
            self._prefill_group(group)

    def _prefill_group(self, rows: list[RowState]) -> None:
        started = time.monotonic()
        self.runtime.set_routing(self._routing(rows))
        prompts = [r.request.prompt_ids for r in rows]
        if rows[0].request.params.prompt_logprobs:  # one unpadded row: logits [1, L, V]
            new, logits = CausalBatch.prefill(self.model, prompts, rows, all_logits=True)
            rows[0].prompt_logprobs = self._prompt_logprobs(rows[0], logits[0])
            logits = logits[:, -1, :]
        else:
            new, logits = CausalBatch.prefill(self.model, prompts, rows)
        new.next_tokens = self._sample(rows, logits)
        self.metrics.on_step(self.mode, len(rows), time.monotonic() - started)
        self.metrics.on_tokens(len(rows))
        batches = [new] if self.batch is None else [self.batch, new]
        self.batch = CausalBatch.concatenate(batches)

    def _sample(self, rows: Sequence[RowState], logits: torch.Tensor) -> torch.Tensor:
        """logits: [B, V] float32 -> tokens [B]; records and emits each row's token."""
        params = [r.request.params for r in rows]
        # A row whose logits are not finite (an adapter that overflows) fails alone; its
        # logits are zeroed so sampling the others is unaffected, and it leaves the batch
        # at the next drop_finished.
        finite = torch.isfinite(logits).all(dim=-1)  # [B]
        if not bool(finite.all()):
            self.fail_non_finite([r for r, ok in zip(rows, finite.tolist(), strict=True) if not ok])
            logits = torch.where(finite.unsqueeze(1), logits, torch.zeros_like(logits))
        tokens = self._select_each(rows, logits)
        chosen: list[float] = []
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if any(p.logprobs or p.top_logprobs for p in params):
            n = max(1, max(p.top_logprobs for p in params))
            c, v, ids = chosen_and_top(logits.log_softmax(-1), tokens, n)
            chosen, top_values, top_ids = c.tolist(), v.tolist(), ids.tolist()
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if row.finished is not None:
                continue
            p = params[i]
            logprob = chosen[i] if chosen and p.logprobs else None
            top: tuple[Logprob, ...] = ()
            if p.top_logprobs:
                pairs = zip(top_ids[i][: p.top_logprobs], top_values[i], strict=False)
                top = tuple(Logprob(t, row.text.text_of(t), lp) for t, lp in pairs)
            self._advance(row, token, logprob, top)
        return tokens

    def _select_each(self, rows: Sequence[RowState], logits: torch.Tensor) -> torch.Tensor:
        """Tokens [B] for `rows`. If the batched processing raises, each row is sampled
        alone and a row that still raises fails by itself (its token is a placeholder
        that is never emitted); a single row's failure propagates to the caller. A row
        whose output grammar cannot go on fails alone too, with the error sampling gives."""
        try:
            tokens, failed = _select(rows, logits, self.eos_ids)
        except Exception:
            if len(rows) == 1:
                raise
            tokens, failed = torch.zeros(len(rows), dtype=torch.long, device=logits.device), {}
            for i, row in enumerate(rows):
                if row.finished is not None:
                    continue
                try:
                    one, bad = _select([row], logits[i : i + 1], self.eos_ids)
                except Exception as exc:
                    self.fail([row], exc)
                    continue
                tokens[i] = one[0]
                if bad:
                    failed[i] = bad[0]
        for i, error in failed.items():
            self.fail([rows[i]], error)
        return tokens

    @staticmethod
    def _prompt_logprobs(row: RowState, logits: torch.Tensor) -> tuple[Logprob, ...]:
        """Every prompt token with its logprob (None for the first) and its alternatives.
        logits: [L, V] for the row's L prompt tokens."""
        ids = row.request.prompt_ids
        n = row.request.params.top_logprobs
        chosen, values, top_ids = prompt_logprobs(
            logits, torch.tensor(ids, device=logits.device), max(n, 1)
        )
        return prompt_logprob_entries(
            ids, chosen.tolist(), values.tolist(), top_ids.tolist(), n, row.text.decode
        )

    def _advance(
        self, row: RowState, token: int, logprob: float | None, top: tuple[Logprob, ...] = ()
    ) -> None:
        """Record one token for a row, emit its TokenEvent, and finish the row if done."""
        now = time.monotonic()
        if row.first_token_at is None:
            row.first_token_at = now
            self.metrics.on_first_token(row.adapter_id, now - row.handle.submitted)
        row.generated.append(token)
        row.seen.append(token)
        full = len(row.generated) >= row.handle.max_new_tokens
        reason: FinishReason | None = None
        params = row.request.params
        special = token in self.eos_ids
        own_text: str | None = None
        if token in params.stop_token_ids:
            # A stop token ends the row as EOS does, its text left out of the output; its
            # own text (logprobs) is what it would have added here.
            own_text = "" if special else row.text.text_of(token)
            piece, reason = row.text.push(None, final=True), "stop"
        elif special and not params.ignore_eos:
            # EOS is not text: it releases what was still held back, and has no text of
            # its own (the held-back text is the own text of the tokens before it).
            piece, reason = row.text.push(None, final=True), "eos"
        else:
            piece = row.text.push(token, final=full)
            if row.text.stopped:
                reason = "stop"
            elif full:
                reason = "length"
        event = TokenEvent(
            token,
            piece,
            row.text.token_text if own_text is None else own_text,
            logprob,
            special=special,
            top_logprobs=top,
            adapter_sha256=row.adapter_sha256,
        )
        row.handle.emit(event)
        if reason is not None:
            self.finish(row, reason)

    def finish(self, row: RowState, reason: FinishReason) -> None:
        """Emit the FinishEvent and release the row's adapter slot (idempotent)."""
        if row.finished is not None:
            return
        row.finished = reason
        request = row.request
        row.handle.emit(
            FinishEvent(
                reason=reason,
                generated_text=row.text.released,
                prompt_tokens=len(request.prompt_ids),
                generated_tokens=len(row.generated),
                token_ids=tuple(row.generated),
                prompt_logprobs=row.prompt_logprobs,
                adapter_sha256=row.adapter_sha256,
            )
        )
        if row.slot is not None:
            self.cache.unpin(row.slot)
        self.metrics.on_finish(
            row.adapter_id,
            reason,
            len(request.prompt_ids),
            len(row.generated),
            time.monotonic() - row.handle.submitted,
        )

    def fail(self, rows: Sequence[RowState], exc: BaseException) -> None:
        """Report an error to `rows` and release them."""
        for row in rows:
            if row.finished is None:
                row.finished = "error"
                # An EngineError already says what the client gets (the server stopping:
                # 503); anything else is this request's server error.
                error = exc
                if not isinstance(exc, EngineError):
                    error = RequestFailedError(
                        f"request {row.request.request_id} failed: {type(exc).__name__}: {exc}"
                    )
                row.handle.emit(error)
                if row.slot is not None:
                    self.cache.unpin(row.slot)

    def fail_non_finite(self, rows: Sequence[RowState]) -> None:
        """Fail the rows whose logits were not finite (an adapter that overflows)."""
        if rows:
            self.fail(rows, FloatingPointError("the model produced non-finite logits"))

    def drop_finished(self) -> None:
        """Remove finished rows from the batch (and cancelled or expired ones, finishing
        them first)."""
        if self.batch is None:
            return
        now = time.monotonic()
        for row in self.batch.rows:
            if row.handle.cancelled:
                self.finish(row, "cancelled")
            elif row.handle.expired(now):
                self.finish(row, "deadline")
        keep = [i for i, r in enumerate(self.batch.rows) if r.finished is None]
        if not keep:
            self.batch = None
        elif len(keep) < len(self.batch):
            self.batch.filter(keep)

    def fail_all(self, exc: BaseException) -> None:
        if self.batch is not None:
            self.fail(self.batch.rows, exc)
        self.batch = None

    def warm_up(self, token_id: int) -> None:
        """One prefill and one decode on the base model, discarded."""
        self.runtime.set_routing([None])
        batch, _ = CausalBatch.prefill(self.model, [[token_id]], [None])
        self.runtime.set_routing([None])
        batch.decode(self.model)


def _select(
    rows: Sequence[RowState], logits: torch.Tensor, eos_ids: Iterable[int]
) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Constrain and process `logits` [B, V] with each row's parameters and grammar, and pick
    its token [B]; also the rows whose grammar cannot go on, with their errors."""
    params = [r.request.params for r in rows]
    tensors = SamplingTensors.from_params(params, logits.device)
    seen = None
    if any(p.repetition_penalty != 1.0 for p in params):
        lists = [
            r.seen if p.repetition_penalty != 1.0 else [] for r, p in zip(rows, params, strict=True)
        ]
        seen = seen_mask(lists, logits.shape[-1], logits.device)
    constraints = [r.request.constraint for r in rows]
    return sample_tokens(
        logits,
        tensors,
        seen,
        [r.generator for r in rows],
        constraints if any(c is not None for c in constraints) else None,
        held_ends(rows, eos_ids, logits.shape[-1], logits.device),
        allowed_only(rows, logits.shape[-1]),
    )


def allowed_only(rows: Sequence[RowState], vocab_size: int) -> torch.Tensor | None:
    """[B, V] bool on the host: the tokens each row may pick at all (its
    `allowed_token_ids`; every token for a row without them); None when no row has any."""
    lists = [r.request.params.allowed_token_ids for r in rows]
    if not any(lists):
        return None
    mask = seen_mask(lists, vocab_size, "cpu")
    for i, ids in enumerate(lists):
        if not ids:
            mask[i] = True
    return mask


def held_ends(
    rows: Sequence[RowState], eos_ids: Iterable[int], vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    """[B, V] bool: the tokens that would end a row that has not yet generated its
    `min_tokens` (EOS unless it ignores EOS, and its stop tokens); None when no row has
    any. Ids beyond the vocabulary (a stop token id that can never be generated, which
    vLLM accepts) are left out: they would index the mask out of bounds."""
    ends: list[list[int]] = []
    for row in rows:
        params = row.request.params
        held: list[int] = []
        if len(row.generated) < params.min_tokens:
            held = list(params.stop_token_ids)
            if not params.ignore_eos:
                held.extend(eos_ids)
        ends.append([t for t in held if 0 <= t < vocab_size])
    return seen_mask(ends, vocab_size, device) if any(ends) else None
