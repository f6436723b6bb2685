"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators, and
vLLM's logits processors (min_tokens, logit_bias, the three penalties, a grammar mask)
and logprobs.

A request with a seed gets its own `torch.Generator`, so its samples depend only on its
own logits, never on what else shares the batch. The processors follow vLLM's sampler
order and semantics: min_tokens (EOS and stop_token_ids at -inf until enough tokens were
generated) and logit_bias (added), then the penalties (repetition over prompt + output
tokens: a positive logit divided by it, a negative one multiplied; frequency and
presence over output tokens: `logit -= frequency * count + presence * (count > 0)`),
then the grammar's mask (worker.constrained), then temperature / top-k / top-p.
Logprobs are vLLM's default `raw_logprobs`: log-softmax of the model's logits before any
processing; they are left in `Sampler.logprobs[request_id]` for the engine to take.
A request that needs none of this takes the batch's fast greedy path as before. Rows with a temperature below
`GREEDY_BELOW_TEMPERATURE` are greedy (as in vLLM: logits / 1e-40 overflow to inf and
softmax turns them into NaN). A row that cannot be sampled (say, logits all NaN) gets its
exception in place of a token id: that request fails, the batch's others go on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from services.errors import InvalidRequest
from worker.sequence import is_finite_number

GREEDY_BELOW_TEMPERATURE = 1e-5
_SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed accepts


MAX_LOGPROBS = 20  # as vLLM's default max_logprobs


class SamplingError(ValueError):
    """One request's logits row could not be sampled."""


@dataclass
class SampleContext:
    """What the processors of one request read beside its params: its tokens (the
    sequence's own list, prompt then output, growing), the ids that end it, its grammar."""

    token_ids: list[int]
    num_prompt_tokens: int
    stop_ids: tuple[int, ...] = ()  # EOS (unless ignore_eos) and stop_token_ids: min_tokens masks them
    matcher: object | None = None  # worker.constrained.GrammarMatcher
    is_plain: bool = False  # no processor and no logprobs, ever: the batch's fast path (set by the engine)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class TopLogprobs:
    """The sampled token's raw logprob and the top k (ids and logprobs, best first)."""

    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class Sampler:
    """Samples one token per logits row; keeps each seeded request's generator."""

    def __init__(self):
        self._generators: dict[str, torch.Generator] = {}
        self._contexts: dict[str, SampleContext] = {}
        self.logprobs: dict[str, TopLogprobs] = {}  # request id -> its last sample's; the engine takes it

    def track(self, request_id: str, context: SampleContext) -> None:
        """Processors of this request read `context` (its tokens, stop ids, grammar)."""
        self._contexts[request_id] = context

    def context(self, request_id: str) -> SampleContext | None:
        return self._contexts.get(request_id)

    def sample(self, logits: torch.Tensor, params: Seq, request_ids: Seq[str]) -> list[int | Exception]:
        """logits [S, V] fp32, params[i] has temperature/top_k/top_p/seed -> S token ids,
        or for a row that failed its exception (that request alone fails)."""
        max_logits, greedy_ids = logits.max(dim=-1)  # [S], [S]; NaN or +inf in a row shows in its max
        is_greedy = [is_greedy_temperature(p.temperature) and not self._is_processed(p, r)
                     for p, r in zip(params, request_ids, strict=True)]
        if all(is_greedy) and bool(torch.isfinite(max_logits).all()):
            return greedy_ids.tolist()
        is_row_finite = torch.isfinite(max_logits).tolist()
        out: list[int | Exception] = []
        for row, request_id in enumerate(request_ids):
            try:
                out.append(self._sample_one(logits[row], params[row], request_id, is_greedy[row],
                                            is_row_finite[row], int(greedy_ids[row])))
            except Exception as exc:  # one request's bad row must not fail the batch
                out.append(exc)
        return out

    def _is_processed(self, p, request_id: str) -> bool:
        """A request whose row goes through the processors or wants logprobs."""
        context = self._contexts.get(request_id)
        if context is None or context.is_plain:
            return False
        return needs_processing(p, context) or getattr(p, "logprobs", None) is not None

    def _sample_one(self, row: torch.Tensor, p, request_id: str, is_greedy: bool,
                    is_finite: bool, greedy_id: int) -> int:
        if self._is_processed(p, request_id):
            return self._sample_processed(row, p, request_id, self._contexts[request_id])
        if not is_finite:
            row = finite_logits(row)
            greedy_id = int(row.argmax())
        if is_greedy:
            return greedy_id
        return sample_row(row, p.temperature, p.top_k, p.top_p, self._generator(request_id, p.seed))

    def _sample_processed(self, row: torch.Tensor, p, request_id: str, context: SampleContext) -> int:
        raw = row.float()  # [V]
        processed = finite_logits(apply_processors(raw.clone(), p, context))  # [V]
        token_id = sample_row(processed, p.temperature, p.top_k, p.top_p, self._generator(request_id, p.seed))
        if getattr(p, "logprobs", None) is not None:
            self.logprobs[request_id] = top_logprobs(raw, token_id, p.logprobs)
        if context.matcher is not None:
            context.matcher.accept(token_id)
        return token_id

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._contexts.pop(request_id, None)
        self.logprobs.pop(request_id, None)

    def generator_state(self, request_id: str) -> bytes:
        """A seeded request's generator state (b"": none yet), to resume it elsewhere."""
        gen = self._generators.get(request_id)
        return bytes(gen.get_state().numpy().tobytes()) if gen is not None else b""

    def set_generator_state(self, request_id: str, state: bytes) -> None:
        gen = torch.Generator()
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        self._generators[request_id] = gen

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None  # torch's default generator
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(int(seed))
            self._generators[request_id] = gen
        return gen


def is_greedy_temperature(temperature: float) -> bool:
    return temperature < GREEDY_BELOW_TEMPERATURE


def greedy(logits: torch.Tensor) -> list[int]:
    """logits [S, V] -> argmax ids."""
    return logits.argmax(dim=-1).tolist()


def finite_logits(row: torch.Tensor) -> torch.Tensor:
    """row [V] with NaN as -inf and +inf as the largest float; SamplingError if nothing is left."""
    row = torch.nan_to_num(row.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                           neginf=float("-inf"))  # [V]
    if not math.isfinite(float(row.max())):
        raise SamplingError("the model's logits for this request are all NaN or -inf")
    return row


def is_plain(p) -> bool:
    """Params no processor acts on and that want no logprobs (min_tokens counts: it acts early)."""
    return not (getattr(p, "presence_penalty", 0.0) or getattr(p, "frequency_penalty", 0.0)
                or getattr(p, "repetition_penalty", 1.0) != 1.0 or getattr(p, "logit_bias", None)
                or getattr(p, "min_tokens", 0) or getattr(p, "logprobs", None) is not None
                or getattr(p, "json_schema", None))


def needs_processing(p, context: SampleContext) -> bool:
    """Some processor changes this request's logits now (min_tokens only while it holds)."""
    return bool(getattr(p, "presence_penalty", 0.0) or getattr(p, "frequency_penalty", 0.0)
                or getattr(p, "repetition_penalty", 1.0) != 1.0 or getattr(p, "logit_bias", None)
                or context.matcher is not None
                or (context.stop_ids and context.num_generated < getattr(p, "min_tokens", 0)))


def apply_processors(logits: torch.Tensor, p, context: SampleContext) -> torch.Tensor:
    """logits [V] fp32 (changed in place) -> min_tokens, logit_bias, penalties, grammar mask."""
    vocab_size = logits.shape[0]
    if context.stop_ids and context.num_generated < getattr(p, "min_tokens", 0):
        ids = [t for t in context.stop_ids if 0 <= t < vocab_size]
        logits[ids] = float("-inf")
    bias = getattr(p, "logit_bias", None)
    if bias:
        ids = torch.tensor([int(t) for t in bias], dtype=torch.long, device=logits.device)  # [B]
        values = torch.tensor([float(b) for b in bias.values()], dtype=logits.dtype, device=logits.device)  # [B]
        logits.index_add_(0, ids, values)
    apply_penalties(logits, context.token_ids, context.num_prompt_tokens, getattr(p, "repetition_penalty", 1.0),
                    getattr(p, "frequency_penalty", 0.0), getattr(p, "presence_penalty", 0.0))
    if context.matcher is not None:
        logits.masked_fill_(~context.matcher.allowed(vocab_size).to(logits.device), float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, token_ids: list[int], num_prompt_tokens: int,
                    repetition: float, frequency: float, presence: float) -> torch.Tensor:
    """vLLM's penalties on logits [V] (in place): repetition over prompt + output tokens,
    frequency and presence over output tokens."""
    vocab_size = logits.shape[0]
    if repetition != 1.0 and token_ids:
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=logits.device)  # [V]
        seen[torch.tensor(token_ids, dtype=torch.long, device=logits.device).clamp_(0, vocab_size - 1)] = True
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)  # [V]
        logits.copy_(torch.where(seen, penalized, logits))
    output_ids = token_ids[num_prompt_tokens:]
    if (frequency or presence) and output_ids:
        output = torch.tensor(output_ids, dtype=torch.long, device=logits.device).clamp_(0, vocab_size - 1)
        counts = torch.bincount(output, minlength=vocab_size)  # [V]
        logits -= frequency * counts.to(logits.dtype) + presence * (counts > 0).to(logits.dtype)
    return logits


def top_logprobs(raw_logits: torch.Tensor, token_id: int, num_top: int) -> TopLogprobs:
    """raw_logits [V] -> the token's log-softmax value and the top `num_top` (best first)."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)  # [V]
    values, ids = torch.topk(logprobs, min(num_top, logprobs.shape[0])) if num_top > 0 else (logprobs[:0], logprobs[:0])
    return TopLogprobs(token_id, float(logprobs[token_id]), [int(i) for i in ids.tolist()], values.tolist())


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """logits [V], finite max -> one token id from softmax(logits / T), restricted by top-k
    then top-p (which always keeps the most likely token)."""
    if is_greedy_temperature(temperature):
        return int(logits.argmax())
    logits = logits.float()
    # shifted so the max is 0: dividing by a small T can then only underflow to -inf, never
    # overflow to inf, and softmax always has one term exp(0) = 1
    scaled = (logits - logits.max()) / temperature  # [V]
    vocab_size = scaled.shape[0]
    if 0 < top_k < vocab_size:
        kth_value = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(descending=True)  # [V], [V]
        is_outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # [V] mass before each token
        is_outside[0] = False  # the most likely token stays, however small top_p is
        choice = torch.multinomial(sorted_probs.masked_fill(is_outside, 0.0), 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_params(p) -> None:
    """engine.SamplingParams check: InvalidRequest naming the parameter for a value out of range."""
    def bad(param, why):
        raise InvalidRequest(f"{param} {why}", param=param)

    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        bad("max_tokens", f"must be an integer >= 1, got {p.max_tokens!r}")
    if not is_finite_number(p.temperature) or p.temperature < 0:
        bad("temperature", f"must be a number >= 0, got {p.temperature!r}")
    if not is_finite_number(p.top_p) or not 0 < p.top_p <= 1:
        bad("top_p", f"must be in (0, 1], got {p.top_p!r}")
    if not _is_int(p.top_k) or p.top_k < 0:
        bad("top_k", f"must be an integer >= 0, got {p.top_k!r}")
    if p.seed is not None and (not _is_int(p.seed) or not _SEED_RANGE[0] <= p.seed < _SEED_RANGE[1]):
        bad("seed", f"must be an integer in [-2**63, 2**64), got {p.seed!r}")
    if isinstance(p.stop, str):
        p.stop = [p.stop]
    if not isinstance(p.stop, list | tuple) or not all(isinstance(s, str) and s for s in p.stop):
        bad("stop", "must be a list of non-empty strings")
    if not isinstance(p.stop_token_ids, list | tuple) or not all(_is_int(t) for t in p.stop_token_ids):
        bad("stop_token_ids", "must be a list of integers")
    _check_extras(p, bad)


def _check_extras(p, bad) -> None:
    """The processors' parameters (vLLM's ranges)."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name, 0.0)
        if not is_finite_number(value) or not -2.0 <= value <= 2.0:
            bad(name, f"must be a number in [-2, 2], got {value!r}")
    repetition = getattr(p, "repetition_penalty", 1.0)
    if not is_finite_number(repetition) or repetition <= 0:
        bad("repetition_penalty", f"must be a number > 0, got {repetition!r}")
    bias = getattr(p, "logit_bias", None) or {}
    if not isinstance(bias, dict) or not all(_is_int(t) and t >= 0 and is_finite_number(b) and -100 <= b <= 100
                                             for t, b in bias.items()):
        bad("logit_bias", "must map token ids to numbers in [-100, 100]")
    num_resumed = getattr(p, "num_resumed_tokens", 0)
    if not _is_int(num_resumed) or num_resumed < 0:
        bad("num_resumed_tokens", f"must be an integer >= 0, got {num_resumed!r}")
    min_tokens = getattr(p, "min_tokens", 0)  # resumed tokens were generated: they count toward both
    if not _is_int(min_tokens) or not 0 <= min_tokens <= p.max_tokens + num_resumed:
        bad("min_tokens", f"must be an integer in [0, max_tokens], got {min_tokens!r}")
    logprobs = getattr(p, "logprobs", None)
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
