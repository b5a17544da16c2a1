"""Parameter names in three layouts, and the one mapping between them.

- ours: ``Transformer.state_dict()`` (routed experts stacked in 3-D tensors, the head is
  ``output``, the expert bias is the ``expert_bias`` buffer, MTP under ``mtp.``);
- the reference's: DeepSeek-V3's own model code (inference/model.py): one tensor per
  expert (``layers.N.ffn.experts.E.w1.weight``), ``head.weight``, ``ffn.gate.bias``;
- Hugging Face's: the released checkpoints (``model.layers.N.self_attn.q_proj.weight``,
  ``mlp.experts.E.gate_proj.weight``, ``lm_head.weight``, ...). The MTP module is layer
  ``n_layers`` there: its block's weights under that layer's usual names, plus ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of the embedding
  (``embed_tokens``) and head (``shared_head.head``), which our model shares with the main
  model.

Hugging Face names map to the reference's by renaming dotted components (the table that
DeepSeek's inference/convert.py uses), and the reference's to ours by the few renames
above; the converter (trainer/convert.py) and the parity test both use these functions.
"""

from __future__ import annotations

import re

import torch

from trainer.model.args import ModelArgs

# Hugging Face component -> the reference's (DeepSeek-V3 inference/convert.py)
HF_COMPONENTS = {
    "embed_tokens": "embed", "self_attn": "attn", "mlp": "ffn",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b",
    "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3",
    "lm_head": "head", "e_score_correction_bias": "bias",
}
REF_COMPONENTS = {v: k for k, v in HF_COMPONENTS.items()}
# MTP-only parts of the MTP layer (Hugging Face name after the layer prefix -> ours)
MTP_PARTS = {"enorm.weight": "mtp.enorm.weight", "hnorm.weight": "mtp.hnorm.weight",
             "eh_proj.weight": "mtp.eh_proj.weight",
             "shared_head.norm.weight": "mtp.norm.weight"}
# the MTP layer's copies of tensors our model shares with the main model
MTP_SHARED = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "output.weight"}
SCALE_SUFFIX = "_scale_inv"  # FP8 block scales: <name>_scale_inv next to <name>

_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(w[123])\.weight")
_STACKED = re.compile(r"(.*\.experts)\.(w[123])")


def ref_to_ours_name(name: str) -> str:
    """One non-expert reference name in our layout (``head.weight`` -> ``output.weight``,
    ``layers.N.ffn.gate.bias`` -> ``layers.N.ffn.gate.expert_bias``)."""
    if name == "head.weight":
        return "output.weight"
    if name.endswith(".gate.bias"):
        return name[: -len("bias")] + "expert_bias"
    return name


def ours_to_ref_name(name: str) -> str:
    if name == "output.weight":
        return "head.weight"
    if name.endswith(".gate.expert_bias"):
        return name[: -len("expert_bias")] + "bias"
    return name


def from_reference(state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """A state dict in the reference's names -> ours, the routed experts stacked."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = _EXPERT.fullmatch(name)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = tensor
        else:
            out[ref_to_ours_name(name)] = tensor
    for (prefix, w), by_expert in experts.items():
        missing = [e for e in range(n_experts) if e not in by_expert]
        if missing or len(by_expert) != n_experts:
            raise KeyError(f"{prefix}.{missing[0] if missing else n_experts}.{w}.weight: "
                           f"expected experts 0..{n_experts - 1}")
        out[f"{prefix}.{w}"] = torch.stack([by_expert[e] for e in range(n_experts)])
    return out


def to_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the reference's names, one tensor per routed expert."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _STACKED.fullmatch(name)
        if m:
            for e in range(tensor.size(0)):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = tensor[e]
        else:
            out[ours_to_ref_name(name)] = tensor
    return out


def hf_to_ref_name(name: str) -> str:
    """A main-model Hugging Face name in the reference's names."""
    if name.startswith("model."):
        name = name[len("model."):]
    return ".".join(HF_COMPONENTS.get(part, part) for part in name.split("."))


def ref_to_hf_name(name: str) -> str:
    hf = ".".join(REF_COMPONENTS.get(part, part) for part in name.split("."))
    return hf if hf.startswith("lm_head.") else "model." + hf


def hf_to_ours(name: str, args: ModelArgs) -> tuple[str, bool]:
    """A Hugging Face tensor name -> (the reference-layout name in our naming, shared):
    the name is ours except that routed experts keep their index
    (``layers.N.ffn.experts.E.w1.weight``, stacked by ``from_reference``); ``shared`` is
    True for the MTP layer's copies of the embedding and head. Raises KeyError for a name
    of no known layout."""
    mtp = f"model.layers.{args.n_layers}."
    if name.startswith(mtp):
        if not args.mtp_depth:
            raise KeyError(f"{name}: an MTP layer, but the config has model.mtp_depth = 0")
        rest = name[len(mtp):]
        if rest in MTP_PARTS:
            return MTP_PARTS[rest], False
        if rest in MTP_SHARED:
            return MTP_SHARED[rest], True
        block = hf_to_ref_name("model.layers.0." + rest)[len("layers.0."):]
        return ref_to_ours_name("mtp.block." + block), False
    if not (name.startswith("model.") or name.startswith("lm_head.")):
        raise KeyError(f"{name}: not a DeepSeek tensor name (model.* or lm_head.*)")
    return ref_to_ours_name(hf_to_ref_name(name)), False


def to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face names (the MTP layer with its copies of the
    embedding and head, as the released checkpoints carry them)."""
    out: dict[str, torch.Tensor] = {}
    mtp = f"model.layers.{args.n_layers}."
    by_ours = {v: k for k, v in MTP_PARTS.items()}
    for name, tensor in to_reference(state).items():
        if name in by_ours:
            out[mtp + by_ours[name]] = tensor
        elif name.startswith("mtp.block."):
            block = ref_to_hf_name("layers.0." + name[len("mtp.block."):])
            out[mtp + block[len("model.layers.0."):]] = tensor
        else:
            out[ref_to_hf_name(name)] = tensor
    if args.mtp_depth:
        for rest, ours in MTP_SHARED.items():
            out[mtp + rest] = state[ours]
    return out
