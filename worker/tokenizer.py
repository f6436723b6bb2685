"""Tokenizer of a Hugging Face checkpoint folder, over the `tokenizers` package.

Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template),
`config.json` and `generation_config.json` (eos ids). Chat templates render in a
sandboxed jinja2 environment set up like transformers' (`raise_exception`, `tojson`,
`strftime_now`, trim_blocks/lstrip_blocks). Fails with `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from services.errors import CheckpointError, InvalidRequest

REPLACEMENT_CHAR = "\ufffd"


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
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

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
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidRequest(f"chat template rejected the messages: {exc}", param="messages") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat prompt ids; the template writes the special tokens itself."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


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
