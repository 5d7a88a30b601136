"""The batch record: the forward pass's only input. A decode step of many sequences and a prompt chunk of another
are one Batch: each token says which sequence (row of `tables`) it belongs to, its position there and the cache
slot its K/V goes to; `logits` lists the tokens whose next-token logits are wanted, in the order they come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .kv_cache import CachedSeq, KVCache


@dataclass
class Batch:
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)  # row of `tables` of each token
    slot: list[int] = field(default_factory=list)  # cache row each token's K/V is written to
    tables: list[list[int]] = field(default_factory=list)  # block ids of each sequence
    logits: list[int] = field(default_factory=list)  # tokens whose logits are returned
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (first token, tokens, table row)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def decode(self) -> bool:
        return all(n == 1 for _, n, _ in self.runs)

    @property
    def max_kv(self) -> int:
        return max(self.pos) + 1 if self.pos else 0

    def add(self, cache: KVCache, seq: CachedSeq, tokens: Sequence[int], start: int, want_logits: bool) -> int:
        """Append tokens of seq at positions start.. (its blocks already reserved); returns the index its logits
        will have in the forward's output, or -1."""
        if not tokens:
            raise ValueError("a batch part needs at least one token")
        row, first = len(self.tables), len(self.ids)
        self.tables.append(list(seq.blocks))
        for i, token in enumerate(tokens):
            self.ids.append(int(token))
            self.pos.append(start + i)
            self.seq.append(row)
            self.slot.append(cache.slot(seq, start + i))
        self.runs.append((first, len(tokens), row))
        if not want_logits:
            return -1
        self.logits.append(len(self.ids) - 1)
        return len(self.logits) - 1
