"""Benchmark items: the math sets read from ``../shared/data`` and synthetic passkey retrieval.

An item is an id, the chat messages that pose it, and the reference the grader compares with.
Prompts go through the model's chat template (see :mod:`.quality`), the way a user of the chat
command would ask.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputError, OptionError
from .answers import gsm8k_reference
from .documents import load_documents

TASKS = ("gsm8k", "math500", "aime24", "passkey", "fidelity", "perplexity", "chat")  # chat: see chat_task
FILES = {
    "gsm8k": "gsm8k_test.jsonl",
    "math500": "math500_test.jsonl",
    "aime24": "aime24_test.jsonl",
    "fidelity": "gsm8k_test.jsonl",
}
# the instruction Qwen2.5 and most open models were tuned to answer math in
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Item:
    id: str
    messages: list[dict]
    reference: str
    depth: Optional[float] = None  # passkey only: where the key sits, 0 = start, 1 = end
    text: Optional[str] = None  # perplexity only: the document, fed as it is
    kind: Optional[str] = None  # perplexity only: prose | code | dialogue


def default_data_dir() -> Path:
    """``$AMSLOCAL_DATA``, else ``../shared/data`` next to the project checkout."""
    env = os.environ.get("AMSLOCAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"benchmark data not found: {path} (use --data DIR)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise InputError(f"{path}:{lineno}: not a JSON line") from None
    return rows


def _math_item(id_: str, problem: str, reference: str) -> Item:
    return Item(id_, [{"role": "user", "content": f"{problem.strip()}\n{MATH_INSTRUCTION}"}], reference)


def load_items(
    task: str,
    n: Optional[int],
    data_dir: Optional[Path] = None,
    *,
    passkey_tokens: int = 2048,
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    tokens_per_filler: float = 12.0,
    doc_tokens: int = 2048,
) -> list[Item]:
    """The first ``n`` items of ``task`` (all when n is None), in the data's order."""
    if task not in TASKS:
        raise OptionError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    if task == "passkey":
        return passkey_items(n or 5, passkey_tokens, depths, tokens_per_filler)
    if task == "perplexity":
        docs = load_documents(Path(data_dir or default_data_dir()), n, doc_tokens)
        return [Item(d.id, [], d.source, text=d.text, kind=d.kind) for d in docs]
    rows = _read_jsonl(Path(data_dir or default_data_dir()) / FILES[task])[:n]
    try:
        if task in ("gsm8k", "fidelity"):
            return [_math_item(f"gsm8k-{i}", r["question"], gsm8k_reference(r["answer"])) for i, r in enumerate(rows)]
        if task == "math500":
            return [
                _math_item(r.get("unique_id", f"math500-{i}"), r["problem"], str(r["answer"]))
                for i, r in enumerate(rows)
            ]
        return [_math_item(f"aime24-{r.get('id', i)}", r["problem"], str(r["answer"])) for i, r in enumerate(rows)]
    except KeyError as exc:
        raise InputError(f"{task} data lacks the field {exc}") from None


# --- passkey ---------------------------------------------------------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
PASSKEY_QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def passkey_items(n_per_depth: int, tokens: int, depths: tuple[float, ...], tokens_per_filler: float) -> list[Item]:
    """``n_per_depth`` items per depth: a 5-digit key in about ``tokens`` tokens of filler.

    Keys come from a fixed seed so that every run (and every resume) asks the same questions.
    ``tokens_per_filler`` is the filler sentence group's length in tokens (about 12 for common
    BPE vocabularies; the quality runner measures it with the model's tokenizer).
    """
    rng = random.Random(1234)
    n_fill = max(1, int(tokens / tokens_per_filler))
    items = []
    for depth in depths:
        for k in range(n_per_depth):
            key = rng.randint(10000, 99999)
            before = int(round(n_fill * depth))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            text = PASSKEY_INTRO + FILLER * before + needle + FILLER * (n_fill - before) + PASSKEY_QUESTION
            items.append(Item(f"passkey-d{depth:.2f}-{k}", [{"role": "user", "content": text}], str(key), depth))
    return items
