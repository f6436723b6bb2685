"""The peers of `c2cserve bench engine`, each in a process of its own with its own defaults.

- transformers (bench/engine_hf.py), in this interpreter, the checkpoint as is;
- llama.cpp (bench/engine_llamacpp.py, llama-cpp-python), when an interpreter with
  `llama_cpp` is given (`--llamacpp-python`, e.g. a venv of its own) or this one has it:
  one process per weight format of ours, on a GGUF file of the same weights at the
  matching type (the checkpoint's bf16/fp16/fp32 -> BF16/F16/F32, int8 -> Q8_0, q4 ->
  Q4_0), written once by bench/gguf_export.py under ~/.cache/c2cserve/bench/gguf.

None of them inherits OMP_WAIT_POLICY=PASSIVE (c2cserve's own setting: it slowed
transformers by ~25%); all get the same thread count. Protocol: one JSON line in, one out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF_TYPE = {"int8": "Q8_0", "q4": "Q4_0"}  # our format -> llama.cpp's type on the same weights
_FLOAT_TYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class Peer:
    """A peer process: reads one JSON line when ready, then answers each job with one."""

    def __init__(self, argv: list[str]):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(ROOT))
        self._read()  # {"ready": true} once the model is loaded

    def run(self, prompts, decode_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "decode_tokens": decode_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a bench peer exited (code {self.proc.wait()}): {self.proc.args}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def llamacpp_python(given: str | None) -> str | None:
    """The interpreter to run llama.cpp with: the given one, or this one if it has llama_cpp."""
    if given:
        return given
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def start_peers(args, modes: list[str | None], dtype: str, threads: int) -> tuple[dict[str, Peer], dict]:
    """(label -> started peer: "transformers" unless --no-hf, "llama.cpp-<TYPE>" per format;
    our format -> the label of llama.cpp on the same format)."""
    peers: dict[str, Peer] = {}
    same_format: dict[str | None, str] = {}
    try:
        if not args.no_hf:
            peers["transformers"] = Peer([sys.executable, "-m", "bench.engine_hf", str(args.model), args.hf_dtype,
                                          str(threads)])
        python = llamacpp_python(args.llamacpp_python)
        for mode in modes if python else ():
            kind = GGUF_TYPE.get(mode) or _FLOAT_TYPE[dtype]
            path = gguf_copy(Path(args.model), kind)
            same_format[mode] = f"llama.cpp-{kind}"
            peers[same_format[mode]] = Peer([python, str(ROOT / "bench" / "engine_llamacpp.py"), str(path),
                                             str(threads), str(args.prompt_len + args.decode_tokens + 8)])
    except BaseException:
        for peer in peers.values():
            peer.close()
        raise
    return peers, same_format


def gguf_copy(model_dir: Path, kind: str) -> Path:
    """The checkpoint as a GGUF file of that type (written once, then reused)."""
    import gguf

    from bench.gguf_export import write_gguf

    root = Path.home() / ".cache" / "c2cserve" / "bench" / "gguf"
    stamp = int((model_dir / "config.json").stat().st_mtime)
    path = root / f"{model_dir.resolve().name}-{stamp}-{kind}.gguf"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        qtype = gguf.GGMLQuantizationType[kind]
        tmp = path.with_suffix(".tmp")
        write_gguf(model_dir, tmp, lambda name: qtype)
        os.replace(tmp, path)
    return path
