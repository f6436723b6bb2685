"""One model step's input: the scheduled tokens of several sequences, flattened.

The engine builds a `ForwardBatch`; `CausalLM.forward` turns it once per step into
`AttentionMetadata` (slot indices and masks shared by every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor        # [T] int64, scheduled tokens of all sequences, concatenated
    positions: torch.Tensor        # [T] int64, absolute positions
    query_lens: list[int]          # tokens scheduled per sequence this step (sum = T)
    context_lens: list[int]        # per sequence: tokens in KV after this step (cached + new)
    block_tables: list[list[int]]  # per sequence: physical KV block ids, in order
    slot_mapping: torch.Tensor     # [T] int64: block_id * block_size + offset for each new token
    logits_indices: torch.Tensor   # [S] int64 index into T: tokens whose logits are returned

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def of_scheduled(cls, batch, block_size: int) -> ForwardBatch:
        """The batch of a `ScheduledBatch`: each sequence's next `num_new_tokens` tokens."""
        seqs = batch.seqs
        return cls.build([s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n]
                          for s, n in zip(seqs, batch.num_new_tokens, strict=True)],
                         [s.num_computed_tokens for s in seqs], [s.block_table for s in seqs], block_size)

    @classmethod
    def build(cls, new_tokens: list[list[int]], num_cached: list[int],
              block_tables: list[list[int]], block_size: int,
              logits: str = "last") -> ForwardBatch:
        """A batch from per-sequence new tokens and how many tokens each has in KV already.

        logits="last" returns the last new token's logits per sequence, "all" every token's.
        """
        ids, positions, slots, logits_idx = [], [], [], []
        for tokens, cached, table in zip(new_tokens, num_cached, block_tables, strict=True):
            first = len(ids)
            for j, token in enumerate(tokens):
                pos = cached + j
                ids.append(token)
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            last = len(ids) - 1
            logits_idx.extend(range(first, last + 1) if logits == "all" else [last])
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        return cls(as_long(ids), as_long(positions), [len(t) for t in new_tokens],
                   [c + len(t) for c, t in zip(num_cached, new_tokens, strict=True)],
                   [list(t) for t in block_tables], as_long(slots), as_long(logits_idx))


@dataclass
class AttentionMetadata:
    """Per-step indices shared by all layers (built once, not per layer).

    Contexts are gathered a whole KV block at a time (contiguous copies), then trimmed
    (prefill) or masked (decode) to each sequence's context length.
    """

    slot_mapping: torch.Tensor               # [T] where new k/v are written
    query_lens: list[int]
    query_starts: list[int]
    context_lens: list[int]
    is_decode: bool                          # every sequence has exactly one new token
    context_blocks: list[torch.Tensor]       # per sequence: [ceil(context_len / block_size)] block ids
    prefill_masks: list[torch.Tensor | None] # per sequence: [q_len, context_len] bool, None = plain causal
    padded_blocks: torch.Tensor | None       # decode: [S, Bmax] block ids (padding: block 0)
    decode_mask: torch.Tensor | None         # decode: [S, 1, 1, span] bool, None = first `decode_span` valid
    decode_span: int = 0                     # decode: key positions to attend (<= Bmax * block_size)
    decode_lows: torch.Tensor | None = None  # decode: [S] int64, first key position attended (window)
    decode_lens: torch.Tensor | None = None  # decode: [S] int64, context length (keys [low, len))
    decode_max_keys: int = 0                 # decode: the most keys one sequence attends (max len - low)


def build_attention_metadata(batch: ForwardBatch, block_size: int,
                             sliding_window: int | None = None) -> AttentionMetadata:
    starts, total = [], 0
    for q_len in batch.query_lens:
        starts.append(total)
        total += q_len
    num_blocks = [-(-n // block_size) for n in batch.context_lens]
    tables = [t[:b] for t, b in zip(batch.block_tables, num_blocks, strict=True)]
    is_decode = all(q == 1 for q in batch.query_lens)
    meta = AttentionMetadata(batch.slot_mapping, list(batch.query_lens), starts, list(batch.context_lens),
                             is_decode, [], [], None, None)
    if is_decode:
        lows = [max(0, n - sliding_window) if sliding_window is not None else 0 for n in batch.context_lens]
        meta.padded_blocks, meta.decode_mask, meta.decode_span = _decode_padding(
            tables, batch.context_lens, lows, block_size)
        meta.decode_lows = torch.tensor(lows, dtype=torch.int64)
        meta.decode_lens = torch.tensor(batch.context_lens, dtype=torch.int64)
        meta.decode_max_keys = max(n - low for n, low in zip(batch.context_lens, lows, strict=True))
    else:
        meta.context_blocks = [torch.tensor(t, dtype=torch.int64) for t in tables]
        meta.prefill_masks = [_prefill_mask(q, n, sliding_window)
                              for q, n in zip(batch.query_lens, batch.context_lens, strict=True)]
    return meta


def _prefill_mask(q_len: int, context_len: int, window: int | None) -> torch.Tensor | None:
    """[q_len, context_len] True where a query may attend: the queries are the last q_len."""
    if q_len == context_len and (window is None or window >= context_len):
        return None
    q_pos = torch.arange(context_len - q_len, context_len)[:, None]
    k_pos = torch.arange(context_len)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _decode_padding(tables: list[list[int]], context_lens: list[int], lows: list[int], block_size: int):
    """Block tables padded to one width, and the SDPA mask (None: trim to a span instead);
    sequence s attends key positions [lows[s], context_lens[s])."""
    max_blocks = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int64)
    span = max_blocks * block_size
    # Equal context lengths and no window (batch 1 always): trim the keys instead of masking;
    # a boolean mask costs SDPA ~50x more than the unmasked path at batch 1.
    if len(set(context_lens)) == 1 and not any(lows):
        return padded, None, context_lens[0]
    pos = torch.arange(span)[None, :]                                     # [1, span]
    mask = (pos < torch.tensor(context_lens)[:, None]) & (pos >= torch.tensor(lows)[:, None])
    return padded, mask[:, None, None, :], span
