"""Async HTTP client that replays a trace against the gateway and times every request.

Each request is a streaming `/v1/completions` call (`stream_options.include_usage`),
sent at its trace time (open loop: a slow server never slows the arrivals). Per request:
TTFT at the first chunk that carries a choice, e2e at the end of the stream, the token
counts from the usage chunk, and whether it was a cold start when the gateway says so
(the gateway's `X-Cold-Start` header, or a `cold_start` field at the top of a chunk, under
`c2c`, or in `usage`). Prompts of a target token length
are built with the model's own tokenizer before the replay starts, so the timed loop
does no tokenization.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which "
    "system model request serving memory token cache slice weight stream latency batch "
    "river mountain garden window music paper silver orange quiet rapid simple bright"
).split()


@dataclass(slots=True)
class PlannedRequest:
    index: int
    t_s: float  # send time, seconds from the start of the replay
    model_id: str
    prompt: str
    prompt_tokens: int  # target prompt length (tokens)
    max_tokens: int


@dataclass(slots=True)
class RequestRecord:
    index: int
    model_id: str
    scheduled_s: float  # trace time
    sent_s: float  # actual send time, from the start of the replay
    prompt_tokens: int  # target prompt length
    max_tokens: int
    ok: bool = False
    http_status: int = 0
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float = 0.0
    num_prompt_tokens: int = 0  # from usage
    num_generated_tokens: int = 0
    num_chunks: int = 0
    cold_start: bool | None = None  # None: the stream did not say
    worker_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class PromptMaker:
    """Prompts of about N tokens for a model, using its tokenizer.json when present."""

    def __init__(self, model_dir: Path | None, seed: int = 0):
        self._rng = random.Random(seed)
        self._tokenizer = None
        path = None if model_dir is None else Path(model_dir) / "tokenizer.json"
        if path is not None and path.is_file():
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(path))

    def make(self, num_tokens: int) -> str:
        """Random words cut to `num_tokens` tokens (approximate without a tokenizer)."""
        if self._tokenizer is None:
            return " ".join(self._rng.choices(_WORDS, k=max(1, num_tokens)))
        text = " ".join(self._rng.choices(_WORDS, k=2 * num_tokens + 8))
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids[:num_tokens]
        return self._tokenizer.decode(ids)

    def count(self, text: str) -> int | None:
        if self._tokenizer is None:
            return None
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def completion_body(req: PlannedRequest, extra: dict | None = None) -> dict:
    body = {
        "model": req.model_id,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 1.0,
        "seed": req.index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return {**body, **(extra or {})}


async def send_one(session: aiohttp.ClientSession, base_url: str, req: PlannedRequest,
                   start_s: float, extra: dict | None = None) -> RequestRecord:
    """Send one streaming request; never raises for server or network errors."""
    sent = time.perf_counter()
    record = RequestRecord(req.index, req.model_id, req.t_s, sent - start_s, req.prompt_tokens, req.max_tokens)
    try:
        async with session.post(f"{base_url}/v1/completions", json=completion_body(req, extra)) as resp:
            record.http_status = resp.status
            _note_headers(resp.headers, record)
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                await _read_stream(resp, record, sent)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
        record.ok = False
    record.e2e_s = time.perf_counter() - sent
    return record


async def _read_stream(resp: aiohttp.ClientResponse, record: RequestRecord, sent: float) -> None:
    finished = False
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = str(chunk["error"].get("message", chunk["error"]))[:200]
            return
        _note_extensions(chunk, record)
        choices = chunk.get("choices") or []
        if choices:
            record.num_chunks += 1
            if record.ttft_s is None:
                record.ttft_s = time.perf_counter() - sent
            finished = finished or bool(choices[0].get("finish_reason"))
        usage = chunk.get("usage")
        if usage:
            record.num_prompt_tokens = int(usage.get("prompt_tokens", 0))
            record.num_generated_tokens = int(usage.get("completion_tokens", 0))
    if not record.num_generated_tokens:
        record.num_generated_tokens = record.num_chunks
    record.ok = record.ttft_s is not None and (finished or record.num_generated_tokens > 0)
    if not record.ok and not record.error:
        record.error = "stream ended without tokens"


def _note_headers(headers, record: RequestRecord) -> None:
    cold = headers.get("X-Cold-Start")
    if cold is not None:
        record.cold_start = cold.strip().lower() in ("1", "true", "yes")
    record.worker_id = headers.get("X-Worker-Id", record.worker_id)


def _note_extensions(chunk: dict, record: RequestRecord) -> None:
    """Pick cold-start and worker info wherever the gateway puts it."""
    for holder in (chunk, chunk.get("c2c") or {}, chunk.get("usage") or {}):
        if "cold_start" in holder and holder["cold_start"] is not None:
            record.cold_start = bool(holder["cold_start"]) or bool(record.cold_start)
        if holder.get("worker_id"):
            record.worker_id = str(holder["worker_id"])


async def replay(base_url: str, planned: list[PlannedRequest], request_timeout_s: float = 300.0,
                 extra: dict | None = None, progress_label: str | None = None,
                 poll_metrics_s: float | None = None) -> tuple[list[RequestRecord], list[ColdStartEvent]]:
    """Send every planned request at its time (open loop); records in the plan's order.

    With `poll_metrics_s`, /metrics is polled meanwhile for cold-start counter increases.
    """
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    bar = _progress(len(planned), progress_label)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        stop = asyncio.Event()
        poller = None
        if poll_metrics_s:
            poller = asyncio.create_task(poll_cold_starts(session, base_url, start, stop, poll_metrics_s))
        tasks = []
        for req in planned:
            delay = start + req.t_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send_one(session, base_url, req, start, extra))
            if bar is not None:
                task.add_done_callback(lambda _t: bar.update(1))
            tasks.append(task)
        records = list(await asyncio.gather(*tasks))
        stop.set()
        events = await poller if poller is not None else []
    if bar is not None:
        bar.close()
    return records, events


def _progress(total: int, label: str | None):
    if label is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", dynamic_ncols=True)


# ---------------------------------------------------------------- cluster probes


def cold_start_counts(base_url: str, timeout_s: float = 10.0) -> dict[tuple[str, str], float] | None:
    """c2c_cold_starts_total per (model, worker) from the gateway's /metrics; None if unreachable."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as resp:
            return parse_cold_start_lines(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError):
        return None


PRIVATE_WEIGHT_FIELDS = ("private_weight_bytes", "loaded_weight_bytes", "weight_bytes_private")


async def worker_hashes(redis_url: str) -> dict[str, dict[str, str]]:
    """Every worker's heartbeat hash (`c2c:worker:<id>`), by worker id."""
    import redis.asyncio as aioredis

    from services import keys

    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        found = {}
        async for key in client.scan_iter(match=keys.WORKER_PATTERN, count=100):
            found[keys.worker_id_of(key)] = await client.hgetall(key)
        return found
    finally:
        await client.aclose()


def private_weight_bytes(hashes: dict[str, dict[str, str]]) -> int | None:
    """Sum over workers of the private weight bytes they report; None if none reports it."""
    total, seen = 0, False
    for fields in hashes.values():
        for name in PRIVATE_WEIGHT_FIELDS:
            if name in fields:
                total += int(float(fields[name]))
                seen = True
                break
    return total if seen else None


_COLD_LINE = re.compile(r'^c2c_cold_starts_total\{([^}]*)\}\s+([0-9.eE+-]+)', re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_cold_start_lines(text: str) -> dict[tuple[str, str], float]:
    """c2c_cold_starts_total per (model, worker) from Prometheus text (a cheap regex)."""
    counts: dict[tuple[str, str], float] = {}
    for labels, value in _COLD_LINE.findall(text):
        fields = dict(_LABEL.findall(labels))
        key = (fields.get("model", ""), fields.get("worker", ""))
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


@dataclass(slots=True)
class ColdStartEvent:
    t_s: float  # poll time, replay clock
    prev_t_s: float  # the poll before, when the counter was still lower
    model_id: str
    worker_id: str
    count: int


async def poll_cold_starts(session: aiohttp.ClientSession, base_url: str, start_s: float,
                           stop: asyncio.Event, interval_s: float = 0.25) -> list[ColdStartEvent]:
    """Poll /metrics until `stop`; one event per increase of a (model, worker) counter."""
    events: list[ColdStartEvent] = []
    last: dict[tuple[str, str], float] = {}
    prev_t = 0.0
    while True:
        try:
            async with session.get(f"{base_url}/metrics") as resp:
                counts = parse_cold_start_lines(await resp.text())
        except (TimeoutError, aiohttp.ClientError):
            counts = last
        now = time.perf_counter() - start_s
        for key, value in counts.items():
            if value > last.get(key, 0.0):
                events.append(ColdStartEvent(now, prev_t, key[0], key[1], int(value - last.get(key, 0.0))))
        last, prev_t = counts, now
        if stop.is_set():
            return events
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass


_LOADED = re.compile(r"model (\S+) loaded \((\d+) bytes\)")
_EVICTED = re.compile(r"evicting model (\S+) \((\d+) bytes\)")


def private_bytes_from_logs(worker_logs: list[str]) -> dict:
    """Workers' private weight bytes (at the end and peak), replayed from their logs.

    The peak comes only from here (the heartbeat carries the current bytes): the
    worker logs "model M loaded (N bytes)" and "evicting model M (N bytes)".
    """
    end_total, peak_total = 0, 0
    for text in worker_logs:
        current, peak = 0, 0
        for line in text.splitlines():
            if match := _LOADED.search(line):
                current += int(match.group(2))
            elif match := _EVICTED.search(line):
                current -= int(match.group(2))
            peak = max(peak, current)
        end_total, peak_total = end_total + current, peak_total + peak
    return {"private_weight_bytes": end_total, "private_weight_peak_bytes": peak_total,
            "private_weight_source": "worker logs (load/evict lines)"}
