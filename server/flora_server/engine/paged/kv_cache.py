"""The paged KV cache's bookkeeping: a fixed pool of blocks, block tables per sequence,
admission by free blocks and adapter-aware prefix caching. No tensors live here (see
`runner.KVTensors` for the storage), so every rule below is testable without a model.

Blocks: the pool has `num_blocks` blocks of `block_size` token positions each, allocated
once. A sequence owns a block table (block ids in position order); position p of the
sequence lives in block `table[p // block_size]` at offset `p % block_size`.

Prefix caching: once every position of a block is computed, the block is hashed as

    h_i = sha256(h_{i-1} || token ids of block i || adapter key)

where the adapter key is the sha256 of the adapter's content ("base" for the base model).
Keying by content, not by adapter id, means an adapter overwritten under the same id (a
new sha256) can never be served KV computed with its old weights. A new sequence reuses
the longest chain of cached blocks matching its prompt, always leaving at least one prompt
token to compute (its logits give the first generated token).

Reference counts: a block is referenced by every sequence whose table holds it. A block
whose count drops to zero keeps its hash and stays reusable until the pool needs it:
unreferenced hashed blocks are evicted least recently freed first; free unhashed blocks
are taken before any cached block is evicted.

Counters (as vLLM reports them): `queries` counts prompt tokens looked up, `hits` the
prompt tokens found cached.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BASE_KEY = "base"


def block_hash(parent: bytes, tokens: Sequence[int], adapter_key: str) -> bytes:
    """sha256 over (parent hash, the block's token ids, adapter content key)."""
    h = hashlib.sha256(parent)
    h.update(len(tokens).to_bytes(4, "little"))
    for token in tokens:
        h.update(int(token).to_bytes(4, "little"))
    h.update(adapter_key.encode())
    return h.digest()


@dataclass(eq=False)
class BlockTable:
    """One sequence's blocks and how many of its positions hold computed KV."""

    adapter_key: str
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the leading full, hashed blocks
    num_computed: int = 0  # positions whose KV is written


class BlockPool:
    """Block allocation, reference counts and the prefix-hash index (see module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; LRU first
        self.queries = 0
        self.hits = 0

    # -- accounting --------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @property
    def num_available(self) -> int:
        """Blocks a sequence could get now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_available

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by sequences (0..1)."""
        return self.num_used / self.num_blocks

    # -- prefix caching ----------------------------------------------------------------

    def match_prefix(self, table: BlockTable, prompt: Sequence[int], count: bool = True) -> int:
        """Attach the longest cached chain of full blocks of `prompt` (same adapter key) to
        an empty `table`. Returns the number of prompt tokens reused. `count=False`: a
        retry of a lookup already counted in `queries` / `hits`."""
        assert not table.blocks, "match_prefix needs an empty block table"
        if count:
            self.queries += len(prompt)
        if not self.prefix_caching:
            return 0
        parent = b""
        usable = (len(prompt) - 1) // self.block_size  # keep one token to compute
        for i in range(usable):
            chunk = prompt[i * self.block_size : (i + 1) * self.block_size]
            digest = block_hash(parent, chunk, table.adapter_key)
            block = self._block_of.get(digest)
            if block is None:
                break
            self._ref(block)
            table.blocks.append(block)
            table.hashes.append(digest)
            parent = digest
        reused = len(table.blocks) * self.block_size
        table.num_computed = reused
        if count:
            self.hits += reused
        return reused

    def commit_full_blocks(self, table: BlockTable, tokens: Sequence[int]) -> None:
        """Hash every block of `table` that is now fully computed and not hashed yet.
        `tokens`: the sequence's token ids (at least `table.num_computed` of them)."""
        if not self.prefix_caching:
            return
        full = table.num_computed // self.block_size
        while len(table.hashes) < full:
            i = len(table.hashes)
            parent = table.hashes[-1] if table.hashes else b""
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            digest = block_hash(parent, chunk, table.adapter_key)
            block = table.blocks[i]
            if digest not in self._block_of and block not in self._hash_of:
                self._block_of[digest] = block
                self._hash_of[block] = digest
            table.hashes.append(digest)

    # -- allocation --------------------------------------------------------------------

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Make `table` hold `num_tokens` positions. All or nothing: returns False (and
        changes nothing) when the pool cannot supply the blocks."""
        need = self.blocks_for(num_tokens) - len(table.blocks)
        if need <= 0:
            return True
        if need > self.num_available:
            return False
        for _ in range(need):
            table.blocks.append(self._take())
        return True

    def release(self, table: BlockTable) -> None:
        """Drop the table's references (its hashed blocks stay cached until evicted)."""
        for block in reversed(table.blocks):  # the tail is the least likely to be shared
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.blocks.clear()
        table.hashes.clear()
        table.num_computed = 0

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def cached_blocks(self) -> int:
        """Blocks that carry a prefix hash (referenced or not)."""
        return len(self._hash_of)
