"""Training data: a learnable synthetic stream, and memory-mapped token shards.

Both sources are indexed by a global sample number, so every rank can compute its own
slice of a step's batch without talking to the others, and resuming needs only one
integer (the number of samples consumed). A sample is seq_len + 1 tokens: inputs are
the first seq_len, targets the last seq_len.

Shard format (written by ``python -m trainer.prepare``): a directory with
``index.json`` = {"format": "dsk-tokens-v1", "dtype": "uint16" | "uint32",
"vocab_size": int, "tokenizer": {"kind": "byte" | "tokenizers", "vocab_size": int,
"doc_separator": int, and for "tokenizers" "path", "sha256", "doc_separator_token"},
"shards": [{"file": str, "tokens": int}, ...]} and the raw little-endian token arrays it
names. Shards whose vocabulary exceeds model.vocab_size are refused.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from trainer.config import InputError

INDEX_NAME = "index.json"
FORMAT = "dsk-tokens-v1"


class SyntheticData:
    """A seeded Markov chain over the vocabulary: each token has ``branching`` possible
    successors, the first twice as likely as each of the others. A model that learns the
    table reaches a loss near the chain's entropy (0.64 nats for branching 2), far below
    log(vocab_size). Sample i depends only on (seed, i)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, branching: int = 2):
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, branching))
        weights = np.ones(branching)
        weights[0] = 2.0
        self.cumulative = np.cumsum(weights / weights.sum())

    def entropy(self) -> float:
        """Per-token entropy of the chain in nats (the best achievable loss)."""
        p = np.diff(np.concatenate([[0.0], self.cumulative]))
        return float(-(p * np.log(p)).sum())

    def sample(self, index: int) -> np.ndarray:
        return self.sample_many([index])[0]

    def sample_many(self, indices: list[int]) -> np.ndarray:
        """Samples ``indices`` as rows of one array. The chains are walked in lockstep,
        one vectorised step per position, so a batch costs seq_len numpy operations
        rather than seq_len per sample; each row equals ``sample(i)``."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        choices = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, index in enumerate(indices):
            rng = np.random.default_rng([self.seed, index])
            out[row, 0] = rng.integers(0, self.vocab_size)
            choices[row] = np.searchsorted(self.cumulative, rng.random(self.seq_len),
                                           side="right")
        walk, steps = out.T, choices.T  # position-major views: each step is contiguous
        for i in range(self.seq_len):
            walk[i + 1] = self.successors[walk[i], steps[i]]
        return out


class TokenShards:
    """Memory-mapped pre-tokenized shards; sample i is the i-th window of seq_len + 1
    tokens (consecutive windows share one token), wrapping around after the last."""

    def __init__(self, path: str | Path, seq_len: int, vocab_size: int, config_file: str = ""):
        root = Path(path)
        index_path = root / INDEX_NAME
        where = config_file or None
        try:
            index = json.loads(index_path.read_text())
        except OSError:
            raise InputError(f"no shard index at {index_path} (run python -m trainer.prepare)",
                             file=where, field="data.path") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{index_path} is not valid JSON: {exc}", file=where,
                             field="data.path") from None
        if index.get("format") != FORMAT or index.get("dtype") not in ("uint16", "uint32"):
            raise InputError(f"{index_path} is not a {FORMAT} index", file=where,
                             field="data.path")
        if index["vocab_size"] > vocab_size:
            raise InputError(f"the shards use a vocabulary of {index['vocab_size']} but "
                             f"model.vocab_size is {vocab_size}", file=where,
                             field="model.vocab_size")
        self.seq_len = seq_len
        self.arrays = []
        for shard in index["shards"]:
            array = np.memmap(root / shard["file"], dtype=index["dtype"], mode="r")
            if array.shape[0] != shard["tokens"]:
                raise InputError(f"{shard['file']} holds {array.shape[0]} tokens, the index "
                                 f"says {shard['tokens']}", file=where, field="data.path")
            if array.shape[0] > seq_len:
                self.arrays.append(array)
        self.windows = [(a.shape[0] - 1) // seq_len for a in self.arrays]
        self.total = sum(self.windows)
        if self.total == 0:
            raise InputError(f"the shards in {root} hold no window of {seq_len + 1} tokens",
                             file=where, field="data.path")
        self.starts = np.cumsum([0] + self.windows[:-1])

    def sample(self, index: int) -> np.ndarray:
        index %= self.total
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        offset = (index - int(self.starts[shard])) * self.seq_len
        return np.asarray(self.arrays[shard][offset: offset + self.seq_len + 1], dtype=np.int64)

    def sample_many(self, indices: list[int]) -> np.ndarray:
        return np.stack([self.sample(i) for i in indices])


class Loader:
    """Deterministic per-rank batches with a resumable position.

    Step s consumes global samples [s*G, (s+1)*G) with G = micro_batch * grad_accum *
    dp_degree; micro-batch m of data-parallel rank r takes the micro_batch samples that
    start at s*G + (m*dp_degree + r)*micro_batch. So the union over ranks does not depend
    on how the global batch is split, and a run resumes from one number."""

    def __init__(self, source: SyntheticData | TokenShards, micro_batch: int, grad_accum: int,
                 dp_rank: int, dp_degree: int, device: torch.device):
        self.source = source
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.device = device
        self.samples_consumed = 0  # global, over all ranks
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data")
        self._ahead: tuple[int, Future] | None = None  # (base sample, its rows)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_degree

    def _rows(self, base: int) -> list[np.ndarray]:
        """This rank's micro-batches of the step that starts at global sample ``base``."""
        rows = []
        for m in range(self.grad_accum):
            first = base + (m * self.dp_degree + self.dp_rank) * self.micro_batch
            rows.append(self.source.sample_many(range(first, first + self.micro_batch)))
        return rows

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches (inputs, targets) of this rank for the next optimizer step.

        The following step's samples are prepared in a background thread meanwhile (the
        synthetic chain is walked on the CPU), so the accelerator does not wait for them."""
        base = self.samples_consumed
        if self._ahead is not None and self._ahead[0] == base:
            rows = self._ahead[1].result()
        else:
            rows = self._rows(base)
        self.samples_consumed += self.global_batch
        self._ahead = (self.samples_consumed,
                       self._pool.submit(self._rows, self.samples_consumed))
        micro_batches = []
        for array in rows:
            batch = torch.from_numpy(array)
            if self.device.type == "cuda":
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            micro_batches.append((batch[:, :-1], batch[:, 1:]))
        return micro_batches

    def state_dict(self) -> dict[str, int]:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples_consumed = int(state["samples_consumed"])


def build_source(cfg, config_file: str = "") -> SyntheticData | TokenShards:
    """The data source a TrainConfig asks for."""
    seq_len = cfg.training.seq_len
    if cfg.data.kind == "shards":
        return TokenShards(cfg.data.path, seq_len, cfg.model.vocab_size, config_file)
    return SyntheticData(cfg.model.vocab_size, seq_len, cfg.training.seed,
                         cfg.data.synthetic_branching)
