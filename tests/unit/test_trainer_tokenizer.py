"""trainer.prepare with a local tokenizer.json: shards decode back to the text, the
index records the tokenizer, and a model vocabulary smaller than the shards' is refused."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from trainer.config import InputError
from trainer.data import TokenShards
from trainer.prepare import prepare

tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6 + "Grüße, naïve café!\n",
         "A second document, with its own words: shards, tokens, windows.\n" * 3]


def make_bpe(path: Path, special: list[str]) -> tokenizers.Tokenizer:
    """A small byte-level BPE trained on TEXTS, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(path))
    return tok


@pytest.fixture
def corpus(tmp_path):
    files = []
    for i, text in enumerate(TEXTS):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    return files


def read_all(data: Path) -> np.ndarray:
    index = json.loads((data / "index.json").read_text())
    return np.concatenate([np.fromfile(data / s["file"], dtype=np.dtype(index["dtype"])
                                       .newbyteorder("<")) for s in index["shards"]])


def test_shards_decode_back_and_index_records_the_tokenizer(tmp_path, corpus):
    path = tmp_path / "tokenizer.json"
    tok = make_bpe(path, [EOT])
    vocab = tok.get_vocab_size()
    assert 256 < vocab <= 320
    index = prepare(corpus, tmp_path / "data", shard_tokens=40, tokenizer=path)
    assert index["dtype"] == "uint16" and index["vocab_size"] == vocab
    eot = tok.token_to_id(EOT)
    assert index["tokenizer"] == {
        "kind": "tokenizers", "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "vocab_size": vocab,
        "doc_separator": eot, "doc_separator_token": EOT}
    assert len(index["shards"]) > 1 and all(s["tokens"] <= 40 for s in index["shards"])
    tokens = read_all(tmp_path / "data")
    assert tokens.size == sum(s["tokens"] for s in index["shards"])
    assert tokens.max() < vocab
    # not the byte-level tokenizer: merges make fewer tokens than bytes
    assert tokens.size < sum(len(t.encode()) for t in TEXTS)
    cuts = np.flatnonzero(tokens == eot)
    assert cuts.tolist() == [cuts[0], tokens.size - 1] and len(cuts) == len(TEXTS)
    pieces = np.split(tokens, cuts + 1)[:-1]
    decoded = [tok.decode([int(t) for t in piece[:-1]]) for piece in pieces]
    assert decoded == TEXTS

    shards = TokenShards(tmp_path / "data", seq_len=16, vocab_size=vocab)
    assert np.array_equal(shards.sample(0), tokens[:17])
    with pytest.raises(InputError) as err:
        TokenShards(tmp_path / "data", seq_len=16, vocab_size=256, config_file="c.toml")
    assert err.value.field == "model.vocab_size" and err.value.file == "c.toml"
    assert str(vocab) in str(err.value) and "256" in str(err.value)


def test_large_vocabulary_uses_uint32(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {"[UNK]": 0, "</s>": 1} | {w: 70_000 + i for i, w in enumerate(words)}
    vocab |= {f"filler{i}": 2 + i for i in range(69_998)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    index = prepare(corpus, tmp_path / "data", tokenizer=path)
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_000 + len(words)
    assert index["tokenizer"]["doc_separator_token"] == "</s>"
    tokens = read_all(tmp_path / "data")
    expected = [vocab[w] for w in TEXTS[0].split()] + [1] + \
        [vocab[w] for w in TEXTS[1].split()] + [1]
    assert tokens.tolist() == expected


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.prepare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_command_line_and_its_errors(tmp_path, corpus):
    path = tmp_path / "tokenizer.json"
    make_bpe(path, ["<pad>", "<end>"])  # no end-of-text token from the default list
    out = tmp_path / "out"
    no_sep = run_prepare(str(out), *map(str, corpus), "--tokenizer", str(path))
    assert no_sep.returncode == 2 and "--doc-separator" in no_sep.stderr
    assert not (out / "index.json").exists()
    wrong = run_prepare(str(out), *map(str, corpus), "--tokenizer", str(path),
                        "--doc-separator", "<nope>")
    assert wrong.returncode == 2 and "'<nope>' is not a token" in wrong.stderr
    missing = run_prepare(str(out), *map(str, corpus), "--tokenizer", str(tmp_path / "x.json"))
    assert missing.returncode == 2 and "x.json: not a readable file" in missing.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    bad = run_prepare(str(out), *map(str, corpus), "--tokenizer", str(junk))
    assert bad.returncode == 2 and "--tokenizer" in bad.stderr and "junk.json" in bad.stderr
    lonely = run_prepare(str(out), *map(str, corpus), "--doc-separator", "<end>")
    assert lonely.returncode == 2 and "needs --tokenizer" in lonely.stderr
    assert not (out / "index.json").exists()
    ok = run_prepare(str(out), *map(str, corpus), "--tokenizer", str(path),
                     "--doc-separator", "<end>")
    assert ok.returncode == 0, ok.stderr
    assert "tokenizers tokenizer" in ok.stdout and "uint16" in ok.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["tokenizer"]["doc_separator_token"] == "<end>"


def test_training_refuses_a_model_vocabulary_smaller_than_the_shards(tmp_path, corpus):
    path = tmp_path / "tokenizer.json"
    vocab = make_bpe(path, [EOT]).get_vocab_size()
    prepare(corpus, tmp_path / "data", tokenizer=path)
    doc = copy.deepcopy(tomllib.loads((ROOT / "trainer/configs/tiny.toml").read_text()))
    doc["data"] = {"kind": "shards", "path": str(tmp_path / "data")}
    lines = []
    for table, values in doc.items():
        lines.append(f"[{table}]")
        lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}"
                  for k, v in values.items()]
    cfg = tmp_path / "shards.toml"
    cfg.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(cfg), "--out",
                           str(tmp_path / "run"), "--steps", "1"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.vocab_size" in proc.stderr
    assert f"vocabulary of {vocab}" in proc.stderr and "model.vocab_size is 256" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
