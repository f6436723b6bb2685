"""Training text for the synthesized checkpoints' byte-level BPE tokenizers.

Offline and deterministic for one Python version: a short English text shipped here plus
the source of a fixed list of standard-library modules (their docstrings and comments
are plain English, their code gives the tokenizer programming words too).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Standard-library files read in this order (missing ones are skipped).
STDLIB_FILES = (
    "LICENSE.txt", "this.py", "textwrap.py", "argparse.py", "pathlib.py", "functools.py",
    "dataclasses.py", "statistics.py", "random.py", "string.py", "heapq.py", "csv.py",
    "calendar.py", "fractions.py", "difflib.py", "json/__init__.py", "logging/__init__.py",
)
MAX_CORPUS_CHARS = 700_000

ENGLISH_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. Hello! How are you today? I am fine, thank you. What is the capital of
France? The capital of France is Paris. Please write a short poem about the sea.
The sea is wide and deep and blue; the waves roll in, the waves roll through.
You are a helpful assistant. Answer the question as briefly as you can. Explain how a
computer stores numbers: it uses bits, each either zero or one, grouped into bytes.
Once upon a time there was a little girl who lived in a village near the forest.
Every morning she walked to the river to fetch water, and every evening she told her
grandmother stories about the birds, the trees and the clouds in the sky.
Machine learning models learn patterns from data. A language model predicts the next
word of a text from the words before it. Large models are served on many machines;
the weights live in memory and each request streams through the layers of the network.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
January, February, March, April, May, June, July, August, September, October, November,
December. One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42 + - * / = < > ( ) [ ] { } " ' : ; , .
Water boils at one hundred degrees Celsius at sea level. The sun rises in the east.
Good morning. Good night. See you tomorrow. Thanks a lot! You're welcome. Sorry, I don't know.
"""


def training_corpus() -> list[str]:
    """Lines of training text, at most MAX_CORPUS_CHARS characters in all."""
    texts = [ENGLISH_TEXT] * 4
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        path = stdlib / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    corpus = "\n".join(texts)[:MAX_CORPUS_CHARS]
    return corpus.splitlines(keepends=True)
