"""Engine v2's block pool and scheduler alone (no model): allocation, prefix hashing by
adapter content, LRU eviction, chunked prefill under the token budget, preemption."""

from __future__ import annotations

import random

import pytest

from flora_server.engine.paged.kv_cache import BASE_KEY, BlockPool, BlockTable, block_hash
from flora_server.engine.paged.scheduler import PagedScheduler


def computed(pool: BlockPool, table: BlockTable, tokens: list[int]) -> None:
    assert pool.grow(table, len(tokens))
    table.num_computed = len(tokens)
    pool.commit_full_blocks(table, tokens)


def test_prefix_match_reuses_full_blocks_of_the_same_adapter_content_only() -> None:
    pool = BlockPool(num_blocks=16, block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: two full blocks and a partial one
    first = BlockTable("sha256:aaa")
    assert pool.match_prefix(first, prompt) == 0
    computed(pool, first, prompt)
    assert pool.cached_blocks() == 2

    same = BlockTable("sha256:aaa")
    assert pool.match_prefix(same, [*prompt, 7]) == 8
    assert same.blocks == first.blocks[:2]
    other = BlockTable("sha256:bbb")  # same id elsewhere, different content: no reuse
    assert pool.match_prefix(other, prompt) == 0
    base = BlockTable(BASE_KEY)
    assert pool.match_prefix(base, prompt) == 0
    # A different first block breaks the chain even where later tokens agree.
    changed = BlockTable("sha256:aaa")
    assert pool.match_prefix(changed, [1, *prompt[1:]]) == 0
    assert (pool.queries, pool.hits) == (11 + 12 + 11 + 11 + 11, 8)


def test_match_always_leaves_one_token_to_compute() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    prompt = list(range(8))
    computed(pool, BlockTable(BASE_KEY), prompt)
    again = BlockTable(BASE_KEY)
    assert pool.match_prefix(again, prompt) == 4  # not 8: the last token's logits are needed


def test_block_hash_depends_on_parent_tokens_and_adapter() -> None:
    h = block_hash(b"", [1, 2], "base")
    assert h != block_hash(b"x", [1, 2], "base")
    assert h != block_hash(b"", [2, 1], "base")
    assert h != block_hash(b"", [1, 2], "sha256:aa")
    assert h == block_hash(b"", [1, 2], "base")


def test_refcounts_free_and_lru_eviction_of_cached_blocks() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    a, b = BlockTable(BASE_KEY), BlockTable(BASE_KEY)
    computed(pool, a, [1, 2, 3, 4])  # blocks 0, 1 hashed
    computed(pool, b, [5, 6])  # block 2 hashed
    assert pool.usage == 0.75
    pool.release(a)  # a's blocks stay cached, evictable (tail first)
    pool.release(b)
    assert pool.usage == 0.0 and pool.num_available == 4 and pool.cached_blocks() == 3
    c = BlockTable(BASE_KEY)
    assert pool.grow(c, 4)  # the free block first, then the least recently freed (a's tail)
    assert c.blocks == [3, 1]
    assert pool.cached_blocks() == 2
    d = BlockTable(BASE_KEY)
    assert pool.match_prefix(d, [1, 2, 3, 4, 9]) == 2  # block 0 survived, block 1 evicted
    assert not pool.grow(d, 2 + 2 * 2)  # all or nothing: only one block is left
    assert len(d.blocks) == 1


def run_to_completion(scheduler: PagedScheduler, new_tokens: dict, steps: int = 500):
    """Drive the scheduler with a fake model: every sampled chunk appends one token;
    checks the budget and the memory bound every step. Returns the plans."""
    pool, plans = scheduler.pool, []
    for _ in range(steps):
        if not scheduler.sequences:
            return plans
        plan = scheduler.schedule()
        plans.append(plan)
        assert plan.num_tokens <= scheduler.token_budget
        for chunk in plan.chunks:
            scheduler.computed(chunk)
            if chunk.sample:
                seq = chunk.seq
                seq.token_ids.append(1000 + len(seq.token_ids))
                if len(seq.token_ids) - seq.row[1] >= new_tokens[seq.row[0]]:
                    scheduler.finish(seq)
        # Allocated blocks stay within one block per sequence of the real tokens.
        live = [s for s in scheduler.sequences if s.table.blocks]
        real = sum(len(s.token_ids) for s in live)
        assert pool.num_used * pool.block_size <= real + pool.block_size * len(live)
    raise AssertionError("did not finish")


def test_long_prompt_is_chunked_and_decode_rows_run_every_step() -> None:
    pool = BlockPool(num_blocks=64, block_size=4)
    scheduler = PagedScheduler(pool, token_budget=8, max_running=8)
    for i in range(2):
        scheduler.add((f"short{i}", 3), [i, 1, 2], BASE_KEY)
    first = scheduler.schedule()  # the two short prompts start
    for chunk in first.chunks:
        scheduler.computed(chunk)
        chunk.seq.token_ids.append(7)
    scheduler.add(("long", 40), list(range(40)), BASE_KEY)
    plan = scheduler.schedule()
    counts = {c.seq.row[0]: c.count for c in plan.chunks}
    assert counts == {"short0": 1, "short1": 1, "long": 6}  # decodes first, then a chunk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workloads_finish_under_a_tight_pool_with_preemption(seed: int) -> None:
    rng = random.Random(seed)
    pool = BlockPool(num_blocks=12, block_size=4, prefix_caching=bool(seed % 2))
    scheduler = PagedScheduler(pool, token_budget=10, max_running=6)
    new_tokens = {}
    for i in range(8):
        n_prompt = rng.randint(1, 20)
        new_tokens[i] = rng.randint(1, 20)
        assert scheduler.fits_alone(n_prompt + new_tokens[i])
        scheduler.add((i, n_prompt), [rng.randint(0, 3) for _ in range(n_prompt)], BASE_KEY)
    plans = run_to_completion(scheduler, new_tokens)
    assert sum(len(p.preempted) for p in plans) >= 1
    assert pool.usage == 0.0
