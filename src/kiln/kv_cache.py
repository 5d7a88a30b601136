"""The paged KV cache: one pool of fixed-size blocks per layer on the device, a block table per sequence, and a
prefix cache of full blocks shared by reference count.

A block holds `block_size` consecutive positions of one sequence for every KV head. A full block is keyed by the
hash of the whole token prefix it ends (a chain: its parent's key and its own tokens), so two prompts that start
alike share the blocks of their common full-block prefix, and a finished sequence's full blocks stay findable
until the pool needs them (least recently released first). Block 0 is never handed out: padding rows of a batch
write there, and padding sequences read it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from .runtime.base import Device, Tensor

PAD_BLOCK = 0
_CACHE_IDS = itertools.count()


@dataclass
class CachedSeq:
    """One sequence's view of the cache: its blocks in order and the tokens whose K/V they hold."""

    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # committed: their K/V are in the cache
    keys: list[int] = field(default_factory=list)  # prefix-cache key of each full block, in order
    reused: int = 0  # tokens found in the prefix cache when the sequence was made


class BlockManager:
    """Host bookkeeping of the pool: free blocks, reference counts, the prefix cache and its LRU order."""

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 2:
            raise ValueError("a KV cache needs at least 2 blocks (block 0 is the padding block)")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.ref = [0] * n_blocks
        self.free: list[int] = list(range(n_blocks - 1, 0, -1))  # popped from the end: low ids first
        self.key_of: dict[int, int] = {}  # block -> its prefix key, for full blocks in the prefix cache
        self.by_key: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # key -> (block, parent key, tokens)
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first
        self.hits = self.lookups = 0

    @property
    def available(self) -> int:
        """Blocks a sequence could take now: free ones and idle cached ones (evicted on demand)."""
        return len(self.free) + len(self.idle)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.n_blocks - 1 - self.available

    def take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)  # the least recently released cached block
            del self.by_key[self.key_of.pop(block)]
        else:
            raise MemoryError("no free KV-cache block")
        self.ref[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self.key_of:
                self.idle[block] = None
            else:
                self.free.append(block)

    def find(self, key: int, parent: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block of this prefix, now held once more; None if absent (or a hash collision)."""
        self.lookups += 1
        hit = self.by_key.get(key)
        if hit is None or hit[1] != parent or hit[2] != tokens:
            return None
        block = hit[0]
        if self.ref[block] == 0:
            del self.idle[block]
        self.ref[block] += 1
        self.hits += 1
        return block

    def remember(self, block: int, key: int, parent: int, tokens: tuple[int, ...]) -> None:
        """Put a block that just became full into the prefix cache (unless that prefix is cached already)."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = (block, parent, tokens)
            self.key_of[block] = key

    def forget(self, block: int) -> None:
        """Take a block out of the prefix cache."""
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.by_key[key]

    def drop_cached(self) -> None:
        """Forget every idle cached block (they become free)."""
        for block in self.idle:
            del self.by_key[self.key_of.pop(block)]
            self.free.append(block)
        self.idle.clear()


def chain_key(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class KVCache:
    """The device pools ([n_kv_heads, n_blocks * block_size, head_dim] per layer, K and V) and their manager."""

    def __init__(
        self,
        dev: Device,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        n_blocks: int,
        block_size: int,
        max_seq_len: int,
    ):
        """max_seq_len: the longest sequence, which sets the width of the block tables."""
        self.dev, self.block_size = dev, block_size
        self.uid = next(_CACHE_IDS)  # names recorded steps that address these pools
        self.table_width = -(-max_seq_len // block_size)
        self.max_seq_len = max_seq_len
        self.blocks = BlockManager(n_blocks, block_size)
        shape = (n_kv_heads, n_blocks * block_size, head_dim)
        self.k = [dev.zeros(shape, dev.kv_dtype) for _ in range(n_layers)]
        self.v = [dev.zeros(shape, dev.kv_dtype) for _ in range(n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def tensors(self) -> list[Tensor]:
        return self.k + self.v

    # --- sequences ----------------------------------------------------------------------------------------------
    def open(self, prompt: list[int]) -> CachedSeq:
        """A new sequence holding the cached full blocks its prompt starts with. At least the prompt's last token
        is left to compute (its logits are needed), so a shared block is never written."""
        seq = CachedSeq()
        B, parent = self.block_size, 0
        for start in range(0, (len(prompt) - 1) // B * B, B):
            tokens = tuple(prompt[start : start + B])
            key = chain_key(parent, tokens)
            block = self.blocks.find(key, parent, tokens)
            if block is None:
                break
            seq.blocks.append(block)
            seq.keys.append(key)
            seq.tokens.extend(tokens)
            parent = key
        seq.reused = len(seq.tokens)
        return seq

    def blocks_needed(self, seq: CachedSeq, n_tokens: int) -> int:
        """More blocks seq needs to hold n_tokens positions."""
        return max(0, -(-n_tokens // self.block_size) - len(seq.blocks))

    def reserve(self, seq: CachedSeq, n_tokens: int) -> bool:
        """Give seq blocks for positions up to n_tokens; False (and nothing taken) if the pool cannot."""
        need = self.blocks_needed(seq, n_tokens)
        if need > self.blocks.available:
            return False
        seq.blocks.extend(self.blocks.take() for _ in range(need))
        return True

    def slot(self, seq: CachedSeq, position: int) -> int:
        B = self.block_size
        return seq.blocks[position // B] * B + position % B

    def commit(self, seq: CachedSeq, tokens: list[int]) -> None:
        """tokens' K/V are now in the cache after seq.tokens; blocks they fill join the prefix cache."""
        B = self.block_size
        seq.tokens.extend(tokens)
        while len(seq.keys) < len(seq.tokens) // B:
            i = len(seq.keys)
            parent = seq.keys[-1] if seq.keys else 0
            block_tokens = tuple(seq.tokens[i * B : (i + 1) * B])
            key = chain_key(parent, block_tokens)
            self.blocks.remember(seq.blocks[i], key, parent, block_tokens)
            seq.keys.append(key)

    def rewind(self, seq: CachedSeq, n_tokens: int) -> None:
        """Keep the first n_tokens positions; later ones will be written again. The blocks past them leave the
        prefix cache (their contents change); one that another sequence shares cannot be rewound into."""
        B = self.block_size
        first = n_tokens // B
        for block in seq.blocks[first : len(seq.keys)]:
            if self.blocks.ref[block] > 1:
                raise ValueError("cannot rewind into a KV-cache block another sequence shares")
            self.blocks.forget(block)
        del seq.tokens[n_tokens:]
        del seq.keys[first:]

    def close_seq(self, seq: CachedSeq) -> None:
        """Give the sequence's blocks back; its full blocks stay in the prefix cache until the pool needs them."""
        for block in seq.blocks:
            self.blocks.release(block)
        seq.blocks, seq.keys, seq.tokens = [], [], []

    def close(self) -> None:
        for t in self.tensors():
            self.dev.free(t)
        self.k, self.v = [], []
