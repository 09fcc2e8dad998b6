"""Long real documents for teacher-forced perplexity (``bench quality --task perplexity``).

Three kinds of text, none of it model output, all readable offline:

- **prose**: windows of the two public-domain novels in ``<data>/longdocs/`` (Project Gutenberg
  header and licence cut off), at fixed fractions of the book;
- **code**: windows of Python standard-library modules, read from the stdlib of the Python that
  runs amslocal (PSF licence; every Python install ships them, so nothing is copied into the
  project; the record names the Python version, and the text's sha256 pins what was read);
- **dialogue**: consecutive GSM8K test questions and their human-written worked answers as
  ``User:`` / ``Assistant:`` turns, from ``<data>/gsm8k_test.jsonl``.

Every window starts at a paragraph (prose, dialogue) or line (code) boundary and is cut to the
requested number of tokens by the runner. The list is interleaved by kind, so ``-n 4`` already
holds every kind.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

CHARS_PER_TOKEN = 8  # generous: a window takes this many characters per wanted token, then is cut

# (id, kind, source, where): for prose the fraction of the book's body where the window starts,
# for code the fraction of the module, for dialogue the first GSM8K row
DOCUMENTS: tuple[tuple[str, str, str, float], ...] = (
    ("pride-0.15", "prose", "longdocs/pride_and_prejudice.txt", 0.15),
    ("code-argparse", "code", "argparse.py", 0.30),
    ("dialogue-gsm8k-100", "dialogue", "gsm8k_test.jsonl", 100),
    ("scarlet-0.25", "prose", "longdocs/a_study_in_scarlet.txt", 0.25),
    ("pride-0.55", "prose", "longdocs/pride_and_prejudice.txt", 0.55),
    ("code-difflib", "code", "difflib.py", 0.40),
    ("dialogue-gsm8k-700", "dialogue", "gsm8k_test.jsonl", 700),
    ("scarlet-0.65", "prose", "longdocs/a_study_in_scarlet.txt", 0.65),
)


@dataclass
class Document:
    id: str
    kind: str  # prose | code | dialogue
    source: str  # where the text comes from, for the record
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _gutenberg_body(text: str) -> str:
    """The book without Project Gutenberg's header and licence (when they are there)."""
    start = text.find("*** START OF")
    if start >= 0:
        text = text[text.find("\n", start) + 1 :]
    end = text.find("*** END OF")
    if end >= 0:
        text = text[:end]
    return text


def _window(text: str, frac: float, n_chars: int, boundary: str) -> str:
    """``n_chars`` of ``text`` from the first ``boundary`` at or after fraction ``frac``."""
    at = int(len(text) * frac)
    nxt = text.find(boundary, at)
    at = nxt + len(boundary) if nxt >= 0 else at
    return text[at : at + n_chars]


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"benchmark data not found: {path} (use --data DIR)")
    return path.read_text(encoding="utf-8", errors="replace")


def _dialogue(path: Path, first: int, n_chars: int) -> str:
    if not path.is_file():
        raise InputError(f"benchmark data not found: {path} (use --data DIR)")
    turns, size = [], 0
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < first or not line.strip():
                continue
            try:
                row = json.loads(line)
                q, a = row["question"].strip(), row["answer"].strip()
            except (json.JSONDecodeError, KeyError):
                raise InputError(f"{path}:{i + 1}: not a GSM8K row") from None
            turn = f"User: {q}\n\nAssistant: {a}\n\n"
            turns.append(turn)
            size += len(turn)
            if size >= n_chars:
                break
    return "".join(turns)


def load_documents(data_dir: Path, n: int | None, doc_tokens: int) -> list[Document]:
    """The first ``n`` documents of :data:`DOCUMENTS` (all when None), each long enough for
    ``doc_tokens`` tokens of any common tokenizer."""
    n_chars = doc_tokens * CHARS_PER_TOKEN
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    py = f"Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    docs = []
    for id_, kind, src, where in DOCUMENTS[:n]:
        if kind == "prose":
            text = _window(_gutenberg_body(_read_text(data_dir / src)), float(where), n_chars, "\n\n")
            source = f"{src} from {where:.2f} of the book"
        elif kind == "code":
            text = _window(_read_text(stdlib / src), float(where), n_chars, "\n")
            source = f"{py} standard library {src} from {where:.2f} of the file"
        else:
            text = _dialogue(data_dir / src, int(where), n_chars)
            source = f"{src} rows {int(where)}+ as User/Assistant turns"
        docs.append(Document(id_, kind, source, text))
    return docs
