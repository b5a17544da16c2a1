"""Tokenize text files into token shards: python -m trainer.prepare OUT_DIR FILE [FILE ...]

The built-in tokenizer is byte-level: every byte of the UTF-8 text is one token
(vocabulary 256), documents (input files) are separated by byte 0, which text does not
contain. ``--tokenizer PATH/tokenizer.json`` uses that file with the ``tokenizers``
library instead (a local file only; nothing is downloaded); documents are then separated
by an end-of-text token of its vocabulary (``--doc-separator``). Shards are flat
little-endian uint16 arrays (uint32 when the vocabulary exceeds 65535) of at most
--shard-tokens tokens, plus index.json (format in trainer/data.py), which records the
tokenizer: its kind, path, sha256 and vocabulary size. Files are written whole: each
shard goes to a temporary name first, and index.json is written last, so a reader never
sees half a data set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainer.data import FORMAT, INDEX_NAME

BYTE_VOCAB = 256
DOC_SEPARATOR = 0
UINT16_MAX_VOCAB = 65535
# End-of-text tokens tried in this order when --doc-separator is not given.
SEPARATOR_CANDIDATES = ("<|endoftext|>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                        "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


def encode_bytes(text: str) -> np.ndarray:
    """The byte-level tokenizer: UTF-8 bytes as token ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def decode_bytes(tokens: np.ndarray) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: Path, doc_separator: str | None = None
                   ) -> tuple[Callable[[str], np.ndarray], dict]:
    """A tokenizer.json file through the ``tokenizers`` library: the encode function and
    the index's "tokenizer" record. Raises ValueError naming the option at fault."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("--tokenizer: the tokenizers package is not installed; pip install "
                         "'tokenizers==0.23.3' (or the trainer extra)") from None
    if not path.is_file():
        raise ValueError(f"--tokenizer: {path}: not a readable file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises its own exception type
        raise ValueError(f"--tokenizer: {path}: not a tokenizer.json the tokenizers library "
                         f"reads ({exc})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    if doc_separator is None:
        found = [t for t in SEPARATOR_CANDIDATES if t in vocab]
        if not found:
            raise ValueError(f"--doc-separator: {path} has none of the end-of-text tokens "
                             f"{', '.join(SEPARATOR_CANDIDATES)}; name the token that "
                             "separates documents")
        doc_separator = found[0]
    if doc_separator not in vocab:
        raise ValueError(f"--doc-separator: {doc_separator!r} is not a token of {path}")
    separator_id = vocab[doc_separator]
    dtype = token_dtype(vocab_size)

    def encode(text: str) -> np.ndarray:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids + [separator_id], dtype=dtype)

    record = {"kind": "tokenizers", "path": str(path.resolve()), "sha256": _sha256(path),
              "vocab_size": vocab_size, "doc_separator": separator_id,
              "doc_separator_token": doc_separator}
    return encode, record


def _encode_bytes_document(text: str) -> np.ndarray:
    return np.concatenate([encode_bytes(text), np.array([DOC_SEPARATOR], dtype=np.uint16)])


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(files: list[Path], out_dir: Path, shard_tokens: int = 1 << 24,
            tokenizer: Path | None = None, doc_separator: str | None = None) -> dict:
    """Tokenize ``files`` into shards under ``out_dir``; returns the index written.

    ``tokenizer``: a tokenizer.json for the tokenizers library instead of the byte-level
    tokenizer. Raises ValueError, naming the file or option, before anything is written."""
    if tokenizer is None:
        encode = _encode_bytes_document
        record = {"kind": "byte", "vocab_size": BYTE_VOCAB, "doc_separator": DOC_SEPARATOR}
    else:
        encode, record = load_tokenizer(tokenizer, doc_separator)
    dtype = token_dtype(record["vocab_size"])
    little_endian = np.dtype(dtype).newbyteorder("<")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush() -> None:
        nonlocal pending, pending_len
        if not pending_len:
            return
        tokens = np.concatenate(pending).astype(little_endian)
        name = f"shard-{len(shards):05d}.bin"
        _write_whole(out_dir / name, tokens.tobytes())
        shards.append({"file": name, "tokens": int(tokens.shape[0])})
        pending, pending_len = [], 0

    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        doc = encode(text)
        while doc.size:
            room = shard_tokens - pending_len
            pending.append(doc[:room])
            pending_len += min(room, doc.size)
            doc = doc[room:]
            if pending_len >= shard_tokens:
                flush()
    flush()
    index = {"format": FORMAT, "dtype": dtype, "vocab_size": record["vocab_size"],
             "tokenizer": record, "shards": shards}
    _write_whole(out_dir / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.split(
        "\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory for the shards and index.json")
    parser.add_argument("files", type=Path, nargs="+", help="UTF-8 text files, one document each")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24,
                        help="tokens per shard (default 16Mi)")
    parser.add_argument("--tokenizer", type=Path, help="a local tokenizer.json (tokenizers "
                        "library) instead of the byte-level tokenizer")
    parser.add_argument("--doc-separator", help="with --tokenizer: the token between "
                        "documents (default: the first of "
                        f"{', '.join(SEPARATOR_CANDIDATES)} in its vocabulary)")
    args = parser.parse_args(argv)
    if args.shard_tokens < 2:
        print("error: --shard-tokens must be at least 2", file=sys.stderr)
        return 2
    for file in args.files:
        if not file.is_file():
            print(f"error: {file}: not a readable file", file=sys.stderr)
            return 2
    if args.doc_separator is not None and args.tokenizer is None:
        print("error: --doc-separator needs --tokenizer", file=sys.stderr)
        return 2
    try:
        index = prepare(args.files, args.out_dir, args.shard_tokens, args.tokenizer,
                        args.doc_separator)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(s["tokens"] for s in index["shards"])
    print(f"wrote {len(index['shards'])} shard(s), {total:,} tokens ({index['dtype']}, "
          f"{index['tokenizer']['kind']} tokenizer, vocabulary {index['vocab_size']:,}), "
          f"to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
