"""Tokenize text files into token shards: python -m trainer.prepare OUT_DIR FILE [FILE ...]

The built-in tokenizer is byte-level: every byte of the UTF-8 text is one token
(vocabulary 256), documents (input files) are separated by byte 0, which text does not
contain. Shards are flat uint16 arrays of at most --shard-tokens tokens plus index.json
(format in trainer/data.py). Files are written whole: each shard goes to a temporary
name first, and index.json is written last, so a reader never sees half a data set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from trainer.data import FORMAT, INDEX_NAME

BYTE_VOCAB = 256
DOC_SEPARATOR = 0


def encode_bytes(text: str) -> np.ndarray:
    """The byte-level tokenizer: UTF-8 bytes as token ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def decode_bytes(tokens: np.ndarray) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(files: list[Path], out_dir: Path, shard_tokens: int = 1 << 24) -> dict:
    """Tokenize ``files`` into shards under ``out_dir``; returns the index written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush() -> None:
        nonlocal pending, pending_len
        if not pending_len:
            return
        tokens = np.concatenate(pending).astype("<u2")
        name = f"shard-{len(shards):05d}.bin"
        _write_whole(out_dir / name, tokens.tobytes())
        shards.append({"file": name, "tokens": int(tokens.shape[0])})
        pending, pending_len = [], 0

    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        doc = np.concatenate([encode_bytes(text),
                              np.array([DOC_SEPARATOR], dtype=np.uint16)])
        while doc.size:
            room = shard_tokens - pending_len
            pending.append(doc[:room])
            pending_len += min(room, doc.size)
            doc = doc[room:]
            if pending_len >= shard_tokens:
                flush()
    flush()
    index = {"format": FORMAT, "dtype": "uint16", "vocab_size": BYTE_VOCAB,
             "tokenizer": "byte", "shards": shards}
    _write_whole(out_dir / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.split(
        "\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory for the shards and index.json")
    parser.add_argument("files", type=Path, nargs="+", help="UTF-8 text files, one document each")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24,
                        help="tokens per shard (default 16Mi)")
    args = parser.parse_args(argv)
    if args.shard_tokens < 2:
        print("error: --shard-tokens must be at least 2", file=sys.stderr)
        return 2
    for file in args.files:
        if not file.is_file():
            print(f"error: {file}: not a readable file", file=sys.stderr)
            return 2
    try:
        index = prepare(args.files, args.out_dir, args.shard_tokens)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(s["tokens"] for s in index["shards"])
    print(f"wrote {len(index['shards'])} shard(s), {total:,} tokens, to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
