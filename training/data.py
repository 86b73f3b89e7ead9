"""Local text data: a member's own .txt/.jsonl files (`load_texts`), the shipped demo
corpus and its deterministic split into trainer shards plus a held-out set, and token
blocks. A member's texts are read on its own node and never leave it: only the sealed
update trained on them does (node/roles/trainer.py).

A text's place in the split is decided by sha256 of the text alone, so every node
computes the same shards and held-out set without coordination, and adding a line to
the corpus moves no other line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from training.errors import DataError, TrainingUsageError

DEMO_CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
HELDOUT_ONE_IN = 10  # ~10% of demo texts are held out for evaluation


DATA_SUFFIXES = (".txt", ".jsonl")


def load_texts(path: str | Path) -> list[str]:
    """A member's own texts (`--data`, `--eval-data`), in a stable order.

    - a .txt file: documents separated by one or more blank lines (a file without blank
      lines is one document; line breaks inside a document are kept);
    - a .jsonl file: one object {"text": "..."} per line (blank lines skipped);
    - a folder: every .txt and .jsonl file under it, recursively, sorted by path; hidden
      files and folders (a name starting with ".") and other suffixes are skipped.

    Texts that are empty or only whitespace are dropped. DataError (naming the path and
    what to do) for a missing path, a folder without data files, a file that is not
    UTF-8, a bad .jsonl line (with its number), or nothing but empty texts."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist: give a .txt or .jsonl file, or a folder of them",
                        reason="no_data")
    files = _data_files(path) if path.is_dir() else [path]
    texts = [text for file in files for text in _read_data_file(file)]
    if not texts:
        raise DataError(f"{path} holds only empty texts: add text", reason="no_text")
    return texts


def _data_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix in DATA_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder} holds no .txt or .jsonl files: put your text there, or point to a file",
                        reason="no_data")
    return files


def _read_data_file(file: Path) -> list[str]:
    if file.suffix not in DATA_SUFFIXES:
        raise DataError(f"{file}: data files must end in .txt or .jsonl", reason="bad_data_format")
    try:
        content = file.read_bytes().decode("utf-8-sig")  # a BOM some editors write is not text
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text (bad byte at offset {exc.start}): convert it to UTF-8 "
                        "or move it out of the data", reason="not_utf8") from exc
    if file.suffix == ".jsonl":
        return [text for text in _jsonl_texts(file, content) if text.strip()]
    documents = (block.strip() for block in _BLANK_LINES.split(content))
    return [document for document in documents if document]


def _jsonl_texts(file: Path, content: str) -> list[str]:
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{number}: not JSON ({exc.msg}); each line must be {{\"text\": \"...\"}}",
                            reason="bad_data_format") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{file}:{number}: each line must be an object with a string field \"text\"",
                            reason="bad_data_format")
        texts.append(record["text"])
    return texts


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def read_local_texts(path: str | Path) -> list[str]:
    """The demo corpus format: texts from a .jsonl file ({"text": ...} per line), a .txt
    file (one text per non-empty line), or a directory of those (sorted by name). A
    member's own data goes through `load_texts`."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".txt"))
        if not files:
            raise TrainingUsageError(f"{path} holds no .jsonl or .txt files",
                                     reason="no_data")
        return [text for file in files for text in read_local_texts(file)]
    if not path.is_file():
        raise TrainingUsageError(f"data path {path} does not exist", reason="no_data")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    raise TrainingUsageError(f"{path}: data files must be .jsonl or .txt",
                             reason="bad_data_format")


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingUsageError(f"{path}:{number}: not JSON ({exc.msg})",
                                     reason="bad_data_format") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TrainingUsageError(f"{path}:{number}: each line must be an object with a "
                                     "string field \"text\"", reason="bad_data_format")
        texts.append(record["text"])
    return texts


@dataclass(frozen=True)
class DemoSplit:
    shards: tuple[tuple[str, ...], ...]
    heldout: tuple[str, ...]


def split_texts(texts: Sequence[str], num_shards: int) -> DemoSplit:
    """Held-out set and `num_shards` trainer shards, each text placed by its own hash."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise TrainingUsageError(f"num_shards must be >= 1, got {num_shards!r}",
                                 reason="bad_hyperparameter")
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    heldout: list[str] = []
    for text in texts:
        bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
        if bucket % HELDOUT_ONE_IN == 0:
            heldout.append(text)
        else:
            shards[(bucket // HELDOUT_ONE_IN) % num_shards].append(text)
    return DemoSplit(tuple(tuple(s) for s in shards), tuple(heldout))


def demo_split(num_shards: int) -> DemoSplit:
    return split_texts(read_local_texts(DEMO_CORPUS), num_shards)


def write_demo_shards(out_dir: str | Path, num_shards: int) -> list[Path]:
    """shard-<i>.jsonl for demo trainers and heldout.jsonl; returns the shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = demo_split(num_shards)
    paths = []
    for index, shard in enumerate(split.shards):
        paths.append(_write_jsonl(out_dir / f"shard-{index}.jsonl", shard))
    _write_jsonl(out_dir / "heldout.jsonl", split.heldout)
    return paths


def _write_jsonl(path: Path, texts: Sequence[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
    return path


def token_blocks(tokenizer, texts: Sequence[str], block_len: int = 64) -> torch.Tensor:
    """Texts joined with EOS and cut into [n, block_len] int64 blocks (tail dropped);
    DataError when they make not even one block."""
    if block_len < 2:
        raise TrainingUsageError(f"block_len must be >= 2, got {block_len}",
                                 reason="bad_hyperparameter")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    count = len(ids) // block_len
    if count == 0:
        raise DataError(f"{len(ids)} tokens, fewer than one block of {block_len}: add text",
                        reason="not_enough_data")
    return torch.tensor(ids[:count * block_len], dtype=torch.long).view(count, block_len)
