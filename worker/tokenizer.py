"""Tokenizer of a Hugging Face checkpoint folder, over the `tokenizers` package.

Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template),
`config.json` and `generation_config.json` (eos ids). Chat templates render in a
sandboxed jinja2 environment set up like transformers' (`raise_exception`, `tojson`,
`strftime_now`, trim_blocks/lstrip_blocks). Fails with `CheckpointError` naming the file,
and with `InvalidRequest` for text or messages it cannot take.

A `Tokenizer` is thread-safe, and never holds the GIL while the Rust side works: `Tokenizer.encode` of the
`tokenizers` package holds it (a 900 KB prompt stopped every other thread of the worker,
heartbeats included, for seconds); `encode_batch_fast` releases it. `encode_bounded`
also bounds the work by the token limit, not by the text's length.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from services.errors import CheckpointError, InvalidRequest

REPLACEMENT_CHAR = "\ufffd"
_FIRST_GUESS_CHARS_PER_TOKEN = 8   # English text runs ~4 characters a token
_CUT_SLACK_TOKENS = 64             # a prefix cut may tokenize a little apart from the whole text
_CUT_SEARCH_CHARS = 1024           # a prefix ends at a space within this many characters


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc


def _token_text(value) -> str | None:
    """tokenizer_config special tokens are a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint needs a tokenizer.json)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from exc
        # transformers ignores a tokenizer.json's truncation and padding unless asked; so do we
        self._tok.no_truncation()
        self._tok.no_padding()
        self._config = _read_json(self.model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(self._config.get("bos_token"))
        self.eos_token = _token_text(self._config.get("eos_token"))
        self.eos_token_ids = self._find_eos_ids()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _find_eos_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        ids += _as_id_list(_read_json(self.model_dir / "generation_config.json").get("eos_token_id"))
        ids += _as_id_list(_read_json(self.model_dir / "config.json").get("eos_token_id"))
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            ids.append(self._tok.token_to_id(self.eos_token))
        return tuple(dict.fromkeys(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, the GIL released while they are computed; InvalidRequest if `text`
        is not valid Unicode (a lone surrogate)."""
        return self._encode(text, add_special_tokens).ids

    def encode_bounded(self, text: str, max_num_tokens: int, add_special_tokens: bool = True) -> list[int] | None:
        """Ids of `text`, or None when it certainly has more than `max_num_tokens` tokens.

        Work is bounded by what that many tokens span, not by len(text): while the text is
        longer than the span guessed, a prefix of it ending at a space is counted first,
        and a prefix over max_num_tokens + _CUT_SLACK_TOKENS means the whole text is over
        too (a cut at a space leaves every word before it whole). Each guess at least
        doubles, so all prefixes together cost less than twice the last one. A text that
        is not certainly over is encoded whole, in one call: its ids are exactly
        encode(text)'s (and may be more than max_num_tokens: the caller checks).
        """
        limit = max_num_tokens + _CUT_SLACK_TOKENS
        num_chars = _FIRST_GUESS_CHARS_PER_TOKEN * limit
        while num_chars < len(text):
            cut = _cut_at_space(text, num_chars)
            num_tokens = len(self._encode(text[:cut], add_special_tokens))
            if num_tokens > limit:
                return None
            # next: the characters `limit` tokens span at this prefix's rate, with a margin
            num_chars = max(2 * num_chars, cut * limit * 5 // (4 * max(num_tokens, 1)))
        return self.encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool):
        """One Encoding; encode_batch_fast releases the GIL (and skips offsets, unused here)."""
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            return encode_batch([text], add_special_tokens=add_special_tokens)[0]
        except Exception as exc:  # the Rust side raises TypeError / plain Exception for bad text
            raise InvalidRequest(f"prompt cannot be tokenized: {exc}", param="prompt") from exc

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # -- chat -------------------------------------------------------------------------
    @cached_property
    def chat_template(self) -> str | None:
        template = self._config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = self.model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return template

    @cached_property
    def _compiled_template(self):
        return _compile_template(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra) -> str:
        """Render messages to the prompt text; InvalidRequest if the template rejects them."""
        import jinja2

        if self.chat_template is None:
            raise InvalidRequest(f"model at {self.model_dir} has no chat template; send a prompt instead")
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequest(f"chat template rejected the messages: {exc}", param="messages") from exc
        except Exception as exc:  # the template is the checkpoint's; what it trips on is the messages
            raise InvalidRequest(f"chat template failed on the messages: {type(exc).__name__}: {exc}",
                                 param="messages") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat prompt ids; the template writes the special tokens itself."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def check_messages(messages) -> None:
    """InvalidRequest unless `messages` is a non-empty list of dicts with a string role."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string role", param="messages")
        if not isinstance(message.get("content"), str | list | None):
            raise InvalidRequest(f"messages[{i}].content must be a string, a list of parts or null",
                                 param="messages")


def _cut_at_space(text: str, num_chars: int) -> int:
    """A prefix length <= num_chars that ends before a space, when one is near."""
    space = text.rfind(" ", max(0, num_chars - _CUT_SEARCH_CHARS), num_chars)
    return space if space > 0 else num_chars


def _compile_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise CheckpointError(f"chat template does not parse: {exc}") from exc


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, never splitting a UTF-8 character.

    Decodes a short window (`prefix_offset`..end) so tokenizers that add spaces by context
    decode the same as a whole-text decode. A delta whose text ends in U+FFFD (a
    character's bytes are not all there yet) is held back until the next token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids)
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(0, self.read_offset - 6)

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text that is safe to emit (maybe '')."""
        self.token_ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back, at the end of the sequence (may end in U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset], skip)
        full_text = decode(self.token_ids[self.prefix_offset :], skip)
        if len(full_text) <= len(prefix_text) or (full_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]


class TextStream:
    """A request's generated text: detokenized token by token, cut at the first stop
    string; text that could be the start of a stop string is held back until it is not."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stops: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.stops = stops
        self.text = ""                # generated text so far (up to a stop string)
        self.num_sent_chars = 0

    def add(self, token_id: int) -> None:
        self.text += self.detok.add(token_id)

    def release(self, final: bool) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop string ended the request."""
        if final:
            self.text += self.detok.flush()
        hit = min((i for s in self.stops if (i := self.text.find(s, self.num_sent_chars)) >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
        end = len(self.text)
        if not final and hit < 0:
            end -= _held_back(self.text, self.num_sent_chars, self.stops)
        new_text = self.text[self.num_sent_chars : end]
        self.num_sent_chars = end
        return new_text, hit >= 0


def _held_back(text: str, start: int, stops: list[str]) -> int:
    """Length of the longest tail of text[start:] that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def prompt_ids(tokenizer: Tokenizer, max_num_tokens: int, vocab_size: int, prompt=None,
               prompt_token_ids=None, messages=None) -> list[int] | None:
    """A request's prompt ids from exactly one of text, ids or chat messages; None when it
    certainly has more than `max_num_tokens`. InvalidRequest naming the field it can't take."""
    if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
        raise InvalidRequest("give exactly one of prompt, prompt_token_ids, messages")
    if messages is not None:
        check_messages(messages)
        text = tokenizer.apply_chat_template(messages)
        ids = tokenizer.encode_bounded(text, max_num_tokens, add_special_tokens=False)  # the template wrote them
    elif prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string", param="prompt")
        ids = tokenizer.encode_bounded(prompt, max_num_tokens)
    else:
        ids = checked_token_ids(prompt_token_ids, max_num_tokens, vocab_size)
    if ids is not None and not ids:
        raise InvalidRequest("prompt is empty (no tokens)", param="prompt")
    return ids


def checked_token_ids(token_ids, max_num_tokens: int, vocab_size: int) -> list[int] | None:
    """Client-given ids as a list, None if there are more than `max_num_tokens`; InvalidRequest
    for an id that is no int in [0, vocab_size) (it would index past the embedding)."""
    if not isinstance(token_ids, list | tuple):
        raise InvalidRequest("prompt_token_ids must be a list of integers", param="prompt")
    if len(token_ids) > max_num_tokens:
        return None  # too long: not worth checking each id
    if not all(type(t) is int for t in token_ids) or (token_ids and not 0 <= min(token_ids) <= max(token_ids) < vocab_size):
        raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
    return list(token_ids)
