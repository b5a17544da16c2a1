"""Data: deterministic synthetic samples, per-rank slices, token shards, prepare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import InputError
from trainer.data import Loader, SyntheticData, TokenShards
from trainer.prepare import decode_bytes, prepare

ROOT = Path(__file__).resolve().parents[2]


def test_synthetic_is_deterministic_and_learnable():
    a, b = SyntheticData(256, 32, seed=3), SyntheticData(256, 32, seed=3)
    assert np.array_equal(a.sample(7), b.sample(7))
    assert not np.array_equal(a.sample(7), a.sample(8))
    assert not np.array_equal(a.sample(7), SyntheticData(256, 32, seed=4).sample(7))
    assert a.entropy() < 0.7 < np.log(256)
    s = a.sample(0)
    assert all(s[i + 1] in a.successors[s[i]] for i in range(32))


def test_a_batch_of_chains_equals_the_chains_one_by_one():
    source = SyntheticData(512, 64, seed=5)
    batch = source.sample_many([3, 9, 4])
    for row, index in zip(batch, [3, 9, 4], strict=True):
        assert np.array_equal(row, source.sample(index))


def test_the_prefetched_step_is_the_step_a_fresh_loader_computes():
    source = SyntheticData(64, 8, seed=2)
    run = Loader(source, 2, 2, 0, 1, torch.device("cpu"))
    run.next_step()  # prepares step 2 in the background
    second = run.next_step()
    fresh = Loader(source, 2, 2, 0, 1, torch.device("cpu"))
    fresh.load_state_dict({"samples_consumed": 4})
    for (a, _), (b, _) in zip(second, fresh.next_step(), strict=True):
        assert torch.equal(a, b)


def _union(dp_degree: int, micro_batch: int, accum: int, steps: int = 2) -> list[list[int]]:
    source = SyntheticData(64, 8, seed=1)
    rows = []
    for rank in range(dp_degree):
        loader = Loader(source, micro_batch, accum, rank, dp_degree, torch.device("cpu"))
        for _ in range(steps):
            for inputs, targets in loader.next_step():
                assert torch.equal(inputs[:, 1:], targets[:, :-1])
                rows += [r.tolist() for r in inputs]
    return sorted(rows)


def test_global_batch_does_not_depend_on_the_split():
    one = _union(1, 4, 2)
    assert one == _union(2, 4, 1) == _union(2, 2, 2) == _union(4, 2, 1)
    assert len({tuple(r) for r in one}) == 16  # every sample distinct


def test_loader_resumes_from_its_position():
    source = SyntheticData(64, 8, seed=1)
    run = Loader(source, 2, 1, 0, 1, torch.device("cpu"))
    run.next_step()
    state = run.state_dict()
    expected = run.next_step()[0][0]
    resumed = Loader(source, 2, 1, 0, 1, torch.device("cpu"))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_step()[0][0], expected)


def test_prepare_writes_shards_that_read_back(tmp_path):
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    docs[0].write_text("hello wörld " * 10)
    docs[1].write_text("second document")
    index = prepare(docs, tmp_path / "data", shard_tokens=50)
    total = sum(s["tokens"] for s in index["shards"])
    assert total == len(("hello wörld " * 10).encode()) + len(b"second document") + 2
    assert len(index["shards"]) == (total + 49) // 50
    assert json.loads((tmp_path / "data" / "index.json").read_text()) == index
    shards = TokenShards(tmp_path / "data", seq_len=8, vocab_size=256)
    first = shards.sample(0)
    assert decode_bytes(first) == "hello wör"[: len(decode_bytes(first))]
    assert shards.sample(1)[0] == first[-1]  # consecutive windows share one token
    assert np.array_equal(shards.sample(shards.total), first)  # wraps around
    with pytest.raises(InputError) as err:
        TokenShards(tmp_path / "data", seq_len=8, vocab_size=128, config_file="c.toml")
    assert err.value.field == "model.vocab_size" and err.value.file == "c.toml"
    with pytest.raises(InputError, match="no shard index"):
        TokenShards(tmp_path, seq_len=8, vocab_size=256)


def test_prepare_command_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc" * 100)
    ok = subprocess.run([sys.executable, "-m", "trainer.prepare", str(tmp_path / "out"),
                         str(text)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "301 tokens" in ok.stdout
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    fail = subprocess.run([sys.executable, "-m", "trainer.prepare", str(tmp_path / "o2"),
                           str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert fail.returncode == 2 and "bad.txt: not UTF-8" in fail.stderr
    assert not (tmp_path / "o2" / "index.json").exists()
