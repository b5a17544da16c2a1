"""Training configuration: TOML -> validated dataclasses.

The file is checked against ``trainer/schemas/train_config.schema.json`` first (unknown
keys and wrong types are named), then against rules that span fields (n_heads divides
dim, top-k <= routed experts, ...). Rules that need the world size run at launch time
through :func:`check_world_size`.

This module must stay free of torch: the control node validates configs with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.model.args import ModelArgs

try:  # on the control node the project's error types are importable
    from dsk_provision.errors import InputError
except ImportError:  # on a node only the trainer package is shipped

    class InputError(ValueError):  # type: ignore[no-redef]
        """Bad training configuration; names the file and the field."""

        exit_code = 2

        def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                     hint: str | None = None):
            where = ": ".join(p for p in (file, field) if p)
            super().__init__(f"{where}: {message}" if where else message)
            self.message = str(self.args[0])
            self.file = file
            self.field = field
            self.hint = hint


SCHEMA_PATH = Path(__file__).parent / "schemas" / "train_config.schema.json"


@dataclass
class TrainingConfig:
    steps: int
    seq_len: int
    micro_batch_size: int
    lr: float
    grad_accum_steps: int = 1
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 autocast on GPU, float32 on CPU
    activation_checkpoint: str = "none"
    compile: bool = False
    fp8: str = "off"  # or a torchao float8 recipe: tensorwise, rowwise, rowwise_with_gw_hp
    fp8_experts: str = "off"  # or "rowwise": the routed experts' grouped GEMMs in FP8
    # linears that training.fp8 leaves in bf16, by module name or its last parts
    fp8_skip: list[str] = field(default_factory=list)
    loss_chunk_tokens: int = 0  # 0: the head's logits for the whole micro-batch at once
    moments_dtype: str = "float32"  # or "bfloat16": AdamW's two moments (trainer.adamw)


@dataclass
class DataConfig:
    kind: str = "synthetic"
    path: str = ""
    synthetic_branching: int = 2


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: every rank not used by the other degrees
    tp: int = 1
    pp: int = 1
    ep: int = 1  # borrowed from dp_shard: dp_shard = (dp_shard / ep) * ep
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # 0: one per pipeline stage
    # FSDP2 (dp_shard > 1): whether each block frees its gathered parameters after its
    # forward (and gathers them again for backward), and the dtype they are gathered and
    # computed in ("bfloat16": half the all-gather bytes, gradients reduced in fp32; needs
    # bf16 training)
    fsdp_reshard_after_forward: bool = True
    fsdp_param_dtype: str = "float32"
    # FSDP2: blocks each block gathers ahead, in forward the next ones, in backward the
    # previous ones (0: FSDP2's own, the next block once the host reaches it)
    fsdp_prefetch: int = 0

    @property
    def fsdp_bf16(self) -> bool:
        """Whether FSDP2 gathers and computes the parameters in bf16."""
        return self.fsdp_param_dtype == "bfloat16"

    @property
    def n_microbatches(self) -> int:
        """Pipeline micro-batches that one training micro-batch is split into."""
        return self.pp_microbatches or self.pp


@dataclass
class CheckpointConfig:
    interval: int = 0
    keep_last: int = 2


@dataclass
class MetricsConfig:
    tensorboard: bool = False  # rank 0 also writes the per-step scalars to <out>/tensorboard


@dataclass
class TrainConfig:
    model: ModelArgs
    training: TrainingConfig
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


_TYPE_WORDS = {"integer": "integer", "number": "number", "boolean": "boolean",
               "string": "string", "object": "table", "array": "array"}


def _did_you_mean(word: str, choices: list[str]) -> str | None:
    """The closest choice to a misspelled word, as the inventory's check suggests them."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def _bounds(schema: dict[str, Any]) -> str:
    """A field's allowed range in words: 'at least 1', 'greater than 0 and at most 1'."""
    words = []
    for key, text in (("minimum", "at least"), ("exclusiveMinimum", "greater than"),
                      ("maximum", "at most"), ("exclusiveMaximum", "less than")):
        if key in schema:
            words.append(f"{text} {schema[key]}")
    return " and ".join(words)


def _schema_error(error: Any, file: str) -> InputError:
    """Turn one jsonschema error into an InputError in the project's words, naming the file
    and the offending field (JSON Schema's own wording names neither)."""
    parent = ".".join(str(p) for p in error.absolute_path)
    field_name = parent or "(top level)"
    schema = error.schema if isinstance(error.schema, dict) else {}
    about = f" ({schema['description']})" if schema.get("description") else ""

    def join(name: str) -> str:
        return f"{parent}.{name}" if parent else name

    if error.validator == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        unknown = sorted(str(k) for k in error.instance if k not in known)
        name = unknown[0] if unknown else "?"
        close = _did_you_mean(name, known)
        advice = f"did you mean {close!r}?" if close else f"known keys here: {', '.join(known)}"
        more = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        return InputError(f"unknown key {name!r}: {advice}{more}", file=file, field=join(name))
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return InputError("required key is missing", file=file, field=join(missing[0]))
    if error.validator == "type":
        expected = error.validator_value
        return InputError(f"expected {expected}, got {type(error.instance).__name__} "
                          f"{error.instance!r}", file=file, field=field_name)
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        return InputError(f"must be {_bounds(schema)}, got {error.instance!r}{about}",
                          file=file, field=field_name)
    if error.validator == "enum":
        choices = [str(c) for c in error.validator_value]
        close = _did_you_mean(str(error.instance), choices)
        advice = f"did you mean {close!r}? " if close and close != str(error.instance) else ""
        return InputError(f"{error.instance!r} is not allowed: {advice}use one of "
                          f"{', '.join(choices)}", file=file, field=field_name)
    if error.validator == "not" and isinstance(error.validator_value, dict) \
            and "const" in error.validator_value:
        return InputError(f"must not be {error.validator_value['const']!r}{about}",
                          file=file, field=field_name)
    if error.validator == "minLength":
        return InputError("must not be empty", file=file, field=field_name)
    return InputError(error.message, file=file, field=field_name)


def _check_rules(raw: dict[str, Any], cfg: TrainConfig, file: str) -> None:
    m, t, d = cfg.model, cfg.training, cfg.data

    def fail(field_name: str, message: str) -> None:
        raise InputError(message, file=file, field=field_name)

    if m.dim % m.n_heads:
        fail("model.n_heads", f"n_heads ({m.n_heads}) must divide model.dim ({m.dim})")
    if m.n_dense_layers > m.n_layers:
        fail("model.n_dense_layers",
             f"n_dense_layers ({m.n_dense_layers}) exceeds n_layers ({m.n_layers})")
    if m.n_activated_experts > m.n_routed_experts:
        fail("model.n_activated_experts", f"top-k ({m.n_activated_experts}) exceeds "
             f"model.n_routed_experts ({m.n_routed_experts})")
    if m.n_routed_experts % m.n_expert_groups:
        fail("model.n_expert_groups", f"n_expert_groups ({m.n_expert_groups}) must divide "
             f"model.n_routed_experts ({m.n_routed_experts})")
    if m.topk_groups > m.n_expert_groups:
        fail("model.topk_groups",
             f"topk_groups ({m.topk_groups}) exceeds n_expert_groups ({m.n_expert_groups})")
    per_group = m.n_routed_experts // m.n_expert_groups
    if m.n_expert_groups > 1 and m.n_activated_experts > m.topk_groups * per_group:
        fail("model.n_activated_experts", f"top-k ({m.n_activated_experts}) exceeds the "
             f"experts in the selected groups ({m.topk_groups} x {per_group})")
    if m.n_expert_groups > 1 and per_group < 2:
        fail("model.n_expert_groups", "group-limited routing needs at least 2 experts per group")
    if m.qk_rope_head_dim % 2:
        fail("model.qk_rope_head_dim", f"must be even, got {m.qk_rope_head_dim}")
    if m.yarn and m.beta_fast <= m.beta_slow:
        fail("model.beta_fast", f"beta_fast ({m.beta_fast}) must exceed model.beta_slow "
             f"({m.beta_slow})")
    if "max_seq_len" in raw.get("model", {}) and t.seq_len > m.max_seq_len:
        fail("training.seq_len", f"seq_len ({t.seq_len}) exceeds model.max_seq_len "
             f"({m.max_seq_len})")
    if t.warmup_steps > t.steps:
        fail("training.warmup_steps", f"warmup_steps ({t.warmup_steps}) exceeds steps "
             f"({t.steps})")
    if d.kind == "shards" and not d.path:
        fail("data.path", "data.kind = 'shards' needs data.path (a directory with index.json)")
    _check_parallel_rules(cfg, fail)


def _check_parallel_rules(cfg: TrainConfig, fail: Any) -> None:
    """Rules between the parallel degrees and the model that need no world size."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    if p.tp > 1:
        for name, value in (("model.n_heads", m.n_heads), ("model.vocab_size", m.vocab_size),
                            ("model.inter_dim", m.inter_dim), ("training.seq_len", t.seq_len)):
            if value % p.tp:
                fail("parallel.tp", f"tp ({p.tp}) must divide {name} ({value})")
        shared = m.n_shared_experts * m.moe_inter_dim
        if shared % p.tp:
            fail("parallel.tp", f"tp ({p.tp}) must divide the shared experts' hidden size "
                 f"(model.n_shared_experts * model.moe_inter_dim = {shared})")
        for field, value in (("fp8", t.fp8), ("fp8_experts", t.fp8_experts)):
            if value != "off":
                fail(f"training.{field}", "FP8 training does not combine with tp > 1 in "
                     f"this version; set training.{field} = \"off\" or tp = 1")
        if t.compile:
            fail("training.compile", "torch.compile does not combine with tp > 1 in this "
                 "version (its backward fails on the sequence-parallel layout); set "
                 "training.compile = false or tp = 1")
    if p.ep > 1:
        if m.n_routed_experts % p.ep:
            fail("parallel.ep", f"ep ({p.ep}) must divide model.n_routed_experts "
                 f"({m.n_routed_experts})")
        if m.n_layers == m.n_dense_layers:
            fail("parallel.ep", "ep > 1 needs MoE layers (model.n_dense_layers < n_layers)")
    if p.pp > 1:
        if m.n_layers < p.pp:
            fail("parallel.pp", f"pp ({p.pp}) exceeds model.n_layers ({m.n_layers}): every "
                 "stage needs at least one layer")
        if m.mtp_depth:
            fail("parallel.pp", "pipeline parallelism does not support MTP in this version; "
                 "set model.mtp_depth = 0 or pp = 1")
        if t.micro_batch_size % p.n_microbatches:
            fail("parallel.pp_microbatches", f"{p.n_microbatches} pipeline micro-batches must "
                 f"divide training.micro_batch_size ({t.micro_batch_size})")
        if p.pp_schedule == "1f1b" and p.n_microbatches < p.pp:
            fail("parallel.pp_microbatches", f"1F1B needs at least pp ({p.pp}) micro-batches, "
                 f"got {p.n_microbatches}")


def parse_config(raw: dict[str, Any], file: str = "<config>") -> TrainConfig:
    """Validate an already-parsed TOML document and build the dataclasses."""
    import jsonschema  # imported here so that `import trainer.config` stays cheap

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise _schema_error(jsonschema.exceptions.best_match(errors), file)
    model = ModelArgs(**raw["model"])
    if "max_seq_len" not in raw["model"]:
        model.max_seq_len = max(model.max_seq_len, raw["training"]["seq_len"])
    cfg = TrainConfig(
        model=model,
        training=TrainingConfig(**raw["training"]),
        data=DataConfig(**raw.get("data", {})),
        parallel=ParallelConfig(**raw.get("parallel", {})),
        checkpoint=CheckpointConfig(**raw.get("checkpoint", {})),
        metrics=MetricsConfig(**raw.get("metrics", {})),
        path=file,
    )
    _check_rules(raw, cfg, file)
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training config. Raises InputError naming file and field."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InputError(f"cannot read the config: {exc.strerror}", file=file) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML: {exc}", file=file) from None
    return parse_config(raw, file)


class DegreeError(ValueError):
    """Parallel degrees that do not fit the world size; ``field`` names the config key."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.hint = hint


def resolve_degrees(dp_replicate: int, dp_shard: int, tp: int, pp: int, ep: int,
                    world_size: int) -> int:
    """The rules between the parallel degrees and the world size, for config validation
    and for ParallelDims: every degree >= 1 (dp_shard may be -1: every rank the others
    leave), dp_replicate * dp_shard * tp * pp == world_size, ep divides dp_shard (expert
    parallelism borrows its ranks from it), and plain DDP (dp_replicate > 1, dp_shard = 1)
    is not combined with tp or pp. Returns dp_shard with -1 resolved; raises DegreeError."""
    for name, value in (("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp), ("ep", ep)):
        if value < 1:
            raise DegreeError(f"parallel degree {name} must be >= 1, got {value}",
                              f"parallel.{name}")
    if world_size < 1:
        raise DegreeError(f"the world size must be >= 1, got {world_size}")
    if dp_shard == -1:
        others = dp_replicate * tp * pp
        if world_size % others:
            raise DegreeError(
                f"world size {world_size} is not divisible by dp_replicate*tp*pp = {others}",
                "parallel.dp_replicate")
        dp_shard = world_size // others
    if dp_shard < 1:
        raise DegreeError(f"dp_shard must be >= 1 or -1, got {dp_shard}", "parallel.dp_shard")
    product = dp_replicate * dp_shard * tp * pp
    if product != world_size:
        raise DegreeError(
            f"dp_replicate*dp_shard*tp*pp = {dp_replicate}*{dp_shard}*{tp}*{pp} = "
            f"{product}, but the world size is {world_size}", "parallel",
            "set parallel.dp_shard = -1 to use every rank, or change the node count")
    if dp_shard % ep:
        raise DegreeError(
            f"ep ({ep}) must divide dp_shard ({dp_shard}): expert parallelism borrows its "
            "ranks from dp_shard", "parallel.ep")
    if dp_replicate > 1 and dp_shard == 1 and (tp > 1 or pp > 1):
        raise DegreeError(
            "plain DDP (dp_replicate > 1, dp_shard = 1) does not combine with tp or pp; "
            "use dp_shard > 1 (FSDP or HSDP) instead", "parallel.dp_replicate")
    return dp_shard


def check_world_size(cfg: TrainConfig, world_size: int) -> None:
    """Raise InputError, naming the file and field, unless the config's parallel degrees
    fit ``world_size`` (see resolve_degrees)."""
    p = cfg.parallel
    try:
        resolve_degrees(p.dp_replicate, p.dp_shard, p.tp, p.pp, p.ep, world_size)
    except DegreeError as exc:
        raise InputError(exc.message, file=cfg.path or None, field=exc.field,
                         hint=exc.hint) from None


def uses_bf16(dtype: str, device_type: str) -> bool:
    """Whether a run computes in bf16: training.dtype "auto" means bf16 autocast on GPU
    and fp32 on CPU (``device_type``: "cuda", "cpu")."""
    return dtype == "bfloat16" or (dtype == "auto" and device_type == "cuda")


def check_fsdp_dtype(cfg: TrainConfig, bf16: bool, device_type: str) -> None:
    """Raise InputError, naming the file and field, when parallel.fsdp_param_dtype asks
    for bf16 parameters in a run that trains in fp32 (``bf16``: whether it trains in
    bf16, from training.dtype and the device)."""
    if cfg.parallel.fsdp_bf16 and not bf16:
        raise InputError(f"bfloat16 parameters need bf16 training, and this run trains in "
                         f"fp32 on {device_type} (training.dtype = {cfg.training.dtype!r})",
                         file=cfg.path or None, field="parallel.fsdp_param_dtype")
