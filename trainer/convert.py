"""Released weights in and out: python -m trainer.convert import|export ...

``import --from DIR --to CKPT --config C`` reads a checkpoint in the Hugging Face
DeepSeek layout (``model.safetensors.index.json`` and its shards, or one
``model.safetensors``): every tensor's name is mapped to the model's
(trainer/model/names.py) and its shape checked against the config before anything is
loaded, FP8 (e4m3) tensors are dequantised with their 128 x 128 block scales
(``<name>_scale_inv``), the routed experts are stacked, and the result is written as a
model-only checkpoint in the trainer's format (torch.distributed.checkpoint, float32 by
default): ``python -m trainer.train --config C --init-from CKPT`` starts a fine-tuning run
from it under any parallel layout, with a fresh optimizer at step 0.

``export --from CKPT --to DIR --config C`` writes a trainer checkpoint (an imported one,
or a run's ``checkpoints/step-N``) back in the Hugging Face layout: safetensors shards
and the index, bfloat16 by default (the gates' ``e_score_correction_bias`` stays float32,
as released), the MTP layer with the copies of the embedding and head it carries there.

Both hold the whole model in host memory (4 bytes per parameter in float32).
Exit codes: 0 done, 2 bad input (one line naming the tensor or file), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from trainer.config import InputError, load_config
from trainer.model.args import ModelArgs
from trainer.model.names import SCALE_SUFFIX, from_reference, hf_to_ours, to_hf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BLOCK = 128  # FP8 block-scale tile (128 x 128), as DeepSeek-V3 releases its weights
MARKER = "IMPORTED"  # written last into an imported checkpoint: its source and config
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# tensors of other inference layouts that carry no weights of the model
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(w[123])\.weight")


class ConvertError(InputError):
    """A checkpoint that does not fit the config; names the tensor."""


def _safetensors():
    """The safetensors package (the trainer extra's pin), or a plain error saying so."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ConvertError("the safetensors package is not installed; pip install "
                           "'safetensors==0.8.0' (or the trainer extra)") from None


@contextlib.contextmanager
def _one_process():
    """DCP in this process alone, without its warning that no process group exists."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes for ``args``, allocating nothing."""
    from trainer.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def shard_files(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = src / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ConvertError("not a safetensors index (no weight_map)",
                               file=str(index)) from None
        files = {name: src / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ConvertError("a shard named in the index is missing", file=str(path))
        return files
    single = src / SINGLE
    if single.is_file():
        _safetensors()
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ConvertError(f"neither {INDEX} nor {SINGLE} is here", file=str(src))


def _headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype), read from the files' headers only."""
    _safetensors()
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    out = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ConvertError(f"{name}: the index places it in this file, which "
                                       "does not hold it", file=str(path))
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def plan_import(files: dict[str, Path], args: ModelArgs) -> dict[str, str]:
    """Check every tensor's name and shape against the config, reading headers only.
    Returns {Hugging Face name: our (reference-layout) name} of the tensors to load;
    raises ConvertError naming the first tensor that does not fit."""
    shapes = expected_shapes(args)
    headers = _headers(files)
    plan: dict[str, str] = {}
    loaded: set[str] = set()
    experts: dict[str, set[int]] = {}
    for name in sorted(headers):
        shape, dtype = headers[name]
        if IGNORED.fullmatch(name):
            continue
        if name.endswith(SCALE_SUFFIX):
            weight = name[: -len(SCALE_SUFFIX)]
            if weight not in headers:
                raise ConvertError(f"{name}: a block scale without its tensor {weight}",
                                   file=str(files[name]))
            continue
        try:
            ours, shared = hf_to_ours(name, args)
        except KeyError as exc:
            raise ConvertError(f"{exc.args[0]}", file=str(files[name])) from None
        m = _EXPERT.fullmatch(ours)
        if m:
            stacked = f"{m[1]}.{m[3]}"
            want = shapes.get(stacked)
            index = int(m[2])
            if want is not None and index >= want[0]:
                raise ConvertError(f"{name}: expert {index}, but the config has "
                                   f"model.n_routed_experts = {want[0]}", file=str(files[name]))
            want = want[1:] if want is not None else None
            key = stacked
        else:
            want = shapes.get(ours)
            key = ours
        if want is None:
            raise ConvertError(f"{name}: the config's model has no such tensor ({ours})",
                               file=str(files[name]))
        if shape != want:
            raise ConvertError(f"{name}: shape {list(shape)}, the config needs {list(want)}",
                               file=str(files[name]))
        if dtype in FP8_DTYPES:
            scale = name + SCALE_SUFFIX
            blocks = [math.ceil(d / BLOCK) for d in shape]
            if scale not in headers:
                raise ConvertError(f"{name}: FP8 without its block scale {scale}",
                                   file=str(files[name]))
            if len(shape) != 2 or list(headers[scale][0]) != blocks:
                raise ConvertError(f"{scale}: shape {list(headers[scale][0])}, {BLOCK}x{BLOCK} "
                                   f"blocks of {list(shape)} need {blocks}",
                                   file=str(files[scale]))
        if shared:
            continue  # the MTP layer's copy of the embedding or head: ours are shared
        if m:
            experts.setdefault(key, set()).add(int(m[2]))
        loaded.add(key)
        plan[name] = ours
    for key, found in experts.items():
        if len(found) != shapes[key][0]:
            missing = min(set(range(shapes[key][0])) - found)
            raise ConvertError(f"{key}: expert {missing} is missing from the checkpoint")
    # the expert bias is optional: gates released without one (DeepSeek-V2) start at zero
    missing = [n for n in shapes if n not in loaded and not n.endswith(".gate.expert_bias")]
    if missing:
        raise ConvertError(f"{missing[0]}: the config's model has this tensor, the checkpoint "
                           f"does not (expected a Hugging Face name such as "
                           f"{_hf_name_of(missing[0], args)})")
    return plan


def _hf_name_of(ours: str, args: ModelArgs) -> str:
    """The Hugging Face name of one of our tensors (the first expert's for stacked ones)."""
    # mtp_depth 0: no copies of the embedding and head added to the one tensor
    return next(iter(to_hf({ours: torch.empty(1, 1)}, dataclasses.replace(args, mtp_depth=0))))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """FP8 weight x its per-block scale (one float32 per 128 x 128 tile), in float32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return weight.float() * scale[:rows, :cols]


def read_hf(src: Path, args: ModelArgs, dtype: torch.dtype = torch.float32
            ) -> dict[str, torch.Tensor]:
    """A Hugging Face DeepSeek checkpoint as our state dict (checked, dequantised,
    experts stacked), in ``dtype``."""
    from safetensors import safe_open

    files = shard_files(src)
    plan = plan_import(files, args)
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path, names in sorted(by_file.items()):
        with safe_open(path, framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_name = name + SCALE_SUFFIX
                    if files[scale_name] == path:
                        scale = f.get_tensor(scale_name)
                    else:
                        with safe_open(files[scale_name], framework="pt") as g:
                            scale = g.get_tensor(scale_name)
                    tensor = dequantize(tensor, scale)
                state[plan[name]] = tensor.to(dtype)
    ours = from_reference(state, args.n_routed_experts)
    shapes = expected_shapes(args)
    for name, shape in shapes.items():
        if name.endswith(".gate.expert_bias") and name not in ours:
            ours[name] = torch.zeros(shape, dtype=dtype)
    return ours


def import_checkpoint(src: Path, dst: Path, config: Path, dtype: str = "float32") -> int:
    """Write ``src`` (Hugging Face layout) as a model-only trainer checkpoint at ``dst``.
    Returns the number of tensors written."""
    import torch.distributed.checkpoint as dcp

    cfg = load_config(config)
    state = read_hf(src, cfg.model, DTYPES[dtype])
    if (dst / MARKER).exists():
        (dst / MARKER).unlink()
    dst.mkdir(parents=True, exist_ok=True)
    with _one_process():
        dcp.save({"model": state}, checkpoint_id=str(dst), no_dist=True)
    info = {"source": str(src), "config": str(config), "dtype": dtype, "tensors": len(state),
            "parameters": sum(t.numel() for t in state.values())}
    tmp = dst / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, dst / MARKER)
    return len(state)


def read_checkpoint(src: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The model tensors of a trainer checkpoint (imported, or a run's step-N), float32,
    in one process."""
    import torch.distributed.checkpoint as dcp

    if not (src / ".metadata").is_file():
        raise ConvertError("not a trainer checkpoint (no .metadata)", file=str(src))
    state = {name: torch.empty(shape) for name, shape in expected_shapes(args).items()}
    try:
        with _one_process():
            dcp.load({"model": state}, checkpoint_id=str(src), no_dist=True)
    except Exception as exc:  # DCP names the key or size that does not match
        raise ConvertError(f"does not fit the config: {str(exc).splitlines()[0]}",
                           file=str(src)) from None
    return state


def write_hf(state: dict[str, torch.Tensor], dst: Path, args: ModelArgs,
             dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 5 << 30) -> list[Path]:
    """``state`` (ours) in the Hugging Face layout: shards of at most ``shard_bytes``
    (a larger tensor gets its own) and the index, written whole."""
    _safetensors()
    from safetensors.torch import save_file

    tensors = {}
    for name, t in to_hf(state, args).items():
        keep = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        tensors[name] = t.detach().to(keep).contiguous().clone()
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, written = {}, []
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tmp = dst / (file + ".tmp")
        save_file({n: tensors[n] for n in names}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, dst / file)
        weight_map.update({n: file for n in names})
        written.append(dst / file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = dst / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, dst / INDEX)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.convert",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face safetensors -> trainer checkpoint")
    exp = sub.add_parser("export", help="trainer checkpoint -> Hugging Face safetensors")
    for p, src, dst in ((imp, "Hugging Face checkpoint directory", "checkpoint directory"),
                        (exp, "trainer checkpoint directory (imported or step-N)",
                         "output directory")):
        p.add_argument("--from", dest="src", type=Path, required=True, help=src)
        p.add_argument("--to", dest="dst", type=Path, required=True, help=dst)
        p.add_argument("--config", type=Path, required=True, help="training config (TOML) "
                       "whose [model] the weights must fit")
    imp.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                     help="dtype stored (default float32: FP8 and bf16 weights exactly)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                     help="dtype written (default bfloat16)")
    exp.add_argument("--shard-gib", type=float, default=5.0, help="largest shard (GiB)")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            n = import_checkpoint(args.src, args.dst, args.config, args.dtype)
            print(f"imported {n} tensors from {args.src} into {args.dst}")
        else:
            cfg = load_config(args.config)
            state = read_checkpoint(args.src, cfg.model)
            files = write_hf(state, args.dst, cfg.model, DTYPES[args.dtype],
                             int(args.shard_gib * (1 << 30)))
            print(f"exported {len(state)} tensors to {len(files)} shard(s) in {args.dst}")
    except InputError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
