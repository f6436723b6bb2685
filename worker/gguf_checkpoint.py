"""A `.gguf` file as a checkpoint folder: converted once, cached, then served like any other.

`checkpoint_dir(path)` returns a folder for a folder, and for a `.gguf` file the folder it
was converted into (under `C2C_GGUF_CACHE`, default `~/.cache/c2cserve/gguf`, keyed by the
file's absolute path, size and mtime; built in a temporary folder and renamed into place):

- config.json / generation_config.json from the file's metadata (`worker.gguf_tensors`);
- model.safetensors: every tensor dequantized exactly (llama.cpp's reference), in bf16
  when the file's matrices are all BF16, else in fp32 (F16, Q8_0, Q4_0, Q4_1, Q4_K and
  Q6_K values are all exact in fp32, not in bf16). Serving them quantized again is
  `--quantize`: q4 gives a Q4_0 tensor back bit for bit (its dequantized group's largest
  magnitude is -8 d, so d and every nibble come out the same); other types are
  re-quantized, not kept (a Q8_0 group scale is not a row scale);
- tokenizer.json / tokenizer_config.json from `tokenizer.ggml.*` (byte-level BPE, the
  "gpt2" tokenizer model of Llama 3 and Qwen2 files; SentencePiece "llama" files are
  refused) and `tokenizer.chat_template`; generation stops at eos, eot and the control
  tokens llama.cpp also treats as end of generation (`<|eot_id|>`, `<|im_end|>`, ...).

`c2cserve models gguf FILE` does the conversion and prints the folder (the launcher runs
it for `up --models x.gguf`, so it imports no worker code itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from services.errors import CheckpointError
from worker.gguf_tensors import field, hf_config, hf_tensors, open_gguf

SUFFIX = ".gguf"
_COMPLETE = ".complete"
_SPLIT_PATTERNS = {  # tokenizer.ggml.pre -> the pre-tokenizer's split regex (None: GPT-2's own)
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
# control tokens that end a generation beside eos/eot, as llama.cpp detects them by text
_END_OF_GENERATION = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>",
                      "</s>")


def is_gguf(path) -> bool:
    return Path(path).suffix == SUFFIX and Path(path).is_file()


def cache_root() -> Path:
    return Path(os.environ.get("C2C_GGUF_CACHE") or Path.home() / ".cache" / "c2cserve" / "gguf")


def checkpoint_dir(path) -> Path:
    """The checkpoint folder for a folder (itself) or a `.gguf` file (converted once, cached).

    Raises CheckpointError for a GGUF file this module cannot serve."""
    path = Path(path)
    if not is_gguf(path):
        return path
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / digest / path.stem  # the folder's name is the model id
    if (out / _COMPLETE).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=out.parent))
    try:
        convert(path, tmp)
        (tmp / _COMPLETE).write_text("ok\n")
        if (out / _COMPLETE).exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(out, ignore_errors=True)  # a half-written folder of a killed process
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write config, weights and tokenizer of a GGUF file into out_dir (an HF checkpoint)."""
    import torch
    from safetensors.torch import save_file

    reader = open_gguf(gguf_path)
    config = hf_config(reader)
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    dtype = torch.bfloat16 if kinds == {"BF16"} else torch.float32
    tensors = {name: torch.from_numpy(np.require(values, requirements="W")).to(dtype)
               for name, values, _ in hf_tensors(reader, config)}
    save_file(tensors, str(out_dir / "model.safetensors"))
    special = _write_tokenizer(reader, out_dir, config["max_position_embeddings"])
    config.update(torch_dtype=str(dtype).removeprefix("torch."), bos_token_id=special["bos"],
                  eos_token_id=special["eos"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": special["gen_eos"]}))


def _write_tokenizer(reader, out_dir: Path, max_length: int) -> dict:
    """tokenizer.json + tokenizer_config.json; returns the bos, eos and generation eos ids."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    eot = field(reader, "tokenizer.ggml.eot_token_id")
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", bos is not None)) and bos is not None
    tokenizer = _bpe_tokenizer(tokens, types, field(reader, "tokenizer.ggml.merges", []),
                               field(reader, "tokenizer.ggml.pre", "default"), tokens[bos] if add_bos else None, bos)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "bos_token": tokens[bos] if bos is not None else None, "eos_token": tokens[eos] if eos is not None else None,
        "add_bos_token": add_bos, "clean_up_tokenization_spaces": False,
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    ends = [i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind == _CONTROL and t in _END_OF_GENERATION]
    return {"bos": bos, "eos": eos, "gen_eos": [i for i in dict.fromkeys((eos, eot, *ends)) if i is not None]}


def _bpe_tokenizer(tokens: list[str], types: list[int], merges: list[str], pre: str, bos: str | None,
                   bos_id: int | None):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre == "llama-bpe")
    tokenizer = Tokenizer(bpe)
    pattern = _SPLIT_PATTERNS.get(pre)
    if pattern is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False)
                          for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a .gguf model file (llama or qwen2 family)")


def run(args) -> int:
    if not is_gguf(args.file):
        raise CheckpointError(f"{args.file}: not a .gguf file")
    print(checkpoint_dir(args.file))
    return 0
