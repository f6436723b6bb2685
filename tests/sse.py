"""Reading an OpenAI-style SSE stream in tests (imported by the test modules)."""

from __future__ import annotations

import json


async def stream_text(resp) -> str:
    """The concatenated text of a completions stream; an error event fails the test."""
    texts = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            texts.append(event["choices"][0]["text"])
    return "".join(texts)
