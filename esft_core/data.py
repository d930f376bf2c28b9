"""Datasets: read and validate chat JSONL / plain-text JSONL / Parquet, format with the ESFT prompt, tokenize, pack.

Chat records are the authors' format: {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}.
The prompt template is the authors': "User: {q}\\n\\nAssistant:" then " {answer}" + EOS, BOS at the start. Text
records are {"text": str}. Parquet files carry the same columns (`messages` as a list of structs, or `text`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from esft_core.errors import EsftError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


def _validate(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise EsftError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise EsftError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise EsftError(f"{where}: each message needs role in {ROLES} and string content")
        for i, m in enumerate(msgs):
            _check_encodable(m["content"], f"{where}: message {i + 1}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise EsftError(f"{where}: 'text' must be a non-empty string")
        _check_encodable(rec["text"], f"{where}: 'text'")
        return {"text": rec["text"]}
    raise EsftError(f"{where}: record has neither 'messages' (chat) nor 'text'")


def _check_encodable(text: str, where: str) -> None:
    """Refuse a string no tokenizer can take: valid JSON can spell a lone UTF-16 surrogate ("\\ud800"), which is
    no Unicode character (the tokenizer would fail later with a TypeError naming neither file nor line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EsftError(f"{where} holds a lone surrogate {text[e.start]!r} at character {e.start + 1} (an escaped "
                        "half of a UTF-16 pair, not a character); fix the escape or drop it") from None


def iter_records(path: str | Path) -> Iterator[dict]:
    """Yield validated records from a .jsonl/.json-lines or .parquet file; bad lines raise with their number."""
    path = Path(path)
    if not path.exists():
        raise EsftError(f"data file {path} does not exist")
    if path.is_dir():
        raise EsftError(f"data path {path} is a directory, expected a .jsonl or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise EsftError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
        kinds = _KindCheck(path)
        for i, rec in enumerate(table.to_pylist()):
            rec = {k: v for k, v in rec.items() if v is not None}
            yield kinds(_validate(rec, f"{path} row {i}"), f"row {i}")
        return
    kinds = _KindCheck(path)
    with open(path, "rb") as f:  # bytes: a bad encoding is reported with its line number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM (Windows editors) is no data
            except UnicodeDecodeError as e:
                raise EsftError(f"{path} line {lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EsftError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise EsftError(f"{path} line {lineno}: JSON nested too deeply; expected a flat chat or text "
                                "record") from None
            yield kinds(_validate(rec, f"{path} line {lineno}"), f"line {lineno}")


class _KindCheck:
    """One kind of record per file: a text record among chats (or the reverse) is an error naming its line."""

    def __init__(self, path: Path):
        self.path, self.kind, self.first = path, None, None

    def __call__(self, rec: dict, where: str) -> dict:
        kind = "chat" if "messages" in rec else "text"
        if self.kind is None:
            self.kind, self.first = kind, where
        elif kind != self.kind:
            raise EsftError(f"{self.path} {where}: a {kind} record in a {self.kind} file ({self.first} is "
                            f"{self.kind}); use one kind per file: all {{\"messages\"}} or all {{\"text\"}}")
        return rec


def read_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """All (or the first `limit`) records of a data file; an empty file is an error."""
    out = []
    for rec in iter_records(path):
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise EsftError(f"data file {path} holds no records")
    return out


def prompt_text(messages: list[dict]) -> str:
    """The generation prompt for a chat: every turn up to (not including) the last assistant answer."""
    parts = []
    for m in messages[:-1] if messages[-1]["role"] == "assistant" else messages:
        if m["role"] == "user":
            parts.append(f"User: {m['content']}\n\nAssistant:")
        elif m["role"] == "assistant":
            parts.append(f" {m['content']}")
        else:
            parts.append(f"{m['content']}\n\n")
    return "".join(parts)


def reference_answer(messages: list[dict]) -> str:
    """The last assistant message (the target of evaluation)."""
    for m in reversed(messages):
        if m["role"] == "assistant":
            return m["content"]
    raise EsftError("chat record has no assistant message")


def encode_chat(messages: list[dict], tok, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat with the ESFT template; labels are IGNORE_INDEX outside assistant turns."""
    ids: list[int] = []
    labels: list[int] = []
    if tok.bos_token_id is not None:
        ids.append(tok.bos_token_id)
        labels.append(IGNORE_INDEX)
    for m in messages:
        if m["role"] == "user":
            piece = tok.encode(f"User: {m['content']}\n\nAssistant:", add_special_tokens=False)
            train = False
        elif m["role"] == "assistant":
            piece = tok.encode(f" {m['content']}", add_special_tokens=False) + [tok.eos_token_id]
            train = True
        else:
            piece = tok.encode(f"{m['content']}\n\n", add_special_tokens=False)
            train = False
        ids.extend(piece)
        labels.extend(piece if (train or not mask_prompt) else [IGNORE_INDEX] * len(piece))
    return ids, labels


def encode_text(text: str, tok) -> tuple[list[int], list[int]]:
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(text, add_special_tokens=False)
    ids.append(tok.eos_token_id)
    return ids, list(ids)


def encode_record(rec: dict, tok, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    if "messages" in rec:
        return encode_chat(rec["messages"], tok, mask_prompt)
    return encode_text(rec["text"], tok)


@dataclass
class PackedBatch:
    """Packed training sequences: ids and labels, each (n_sequences, seq_len)."""

    input_ids: list[list[int]]
    labels: list[list[int]]


def pack(examples: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0) -> PackedBatch:
    """Concatenate examples and cut into seq_len windows (the last one padded with IGNORE_INDEX labels).

    Examples longer than seq_len are truncated rather than split, so an answer is never separated from its prompt.
    """
    if seq_len < 2:
        raise EsftError(f"--seq-len must be at least 2, got {seq_len}")
    seqs, labs = [], []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    for ids, lab in examples:
        ids, lab = ids[:seq_len], lab[:seq_len]
        if len(cur_ids) + len(ids) > seq_len:
            seqs.append(cur_ids + [pad_id] * (seq_len - len(cur_ids)))
            labs.append(cur_lab + [IGNORE_INDEX] * (seq_len - len(cur_lab)))
            cur_ids, cur_lab = [], []
        cur_ids += ids
        cur_lab += lab
    if cur_ids:
        seqs.append(cur_ids + [pad_id] * (seq_len - len(cur_ids)))
        labs.append(cur_lab + [IGNORE_INDEX] * (seq_len - len(cur_lab)))
    return PackedBatch(seqs, labs)
