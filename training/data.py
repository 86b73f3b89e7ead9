"""Local text data: a trainer's own JSONL/.txt files, the shipped demo corpus and its
deterministic split into trainer shards plus a held-out set, and token blocks.

A text's place in the split is decided by sha256 of the text alone, so every node
computes the same shards and held-out set without coordination, and adding a line to
the corpus moves no other line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from training.errors import TrainingUsageError

DEMO_CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
HELDOUT_ONE_IN = 10  # ~10% of demo texts are held out for evaluation


def read_local_texts(path: str | Path) -> list[str]:
    """Texts from a .jsonl file ({"text": ...} per line), a .txt file (one text per
    non-empty line), or a directory of those (sorted by name)."""
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
    """Texts joined with EOS and cut into [n, block_len] int64 blocks (tail dropped)."""
    if block_len < 2:
        raise TrainingUsageError(f"block_len must be >= 2, got {block_len}",
                                 reason="bad_hyperparameter")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    count = len(ids) // block_len
    if count == 0:
        raise TrainingUsageError(f"{len(ids)} tokens make no block of {block_len}; give "
                                 "more text or a shorter block_len", reason="not_enough_data")
    return torch.tensor(ids[:count * block_len], dtype=torch.long).view(count, block_len)
