"""Layer kinds for breakdowns: attention, mlp, norm, embedding, other.

Module types decide where they are unambiguous (nn.Embedding, LayerNorm/RMSNorm); otherwise
the parameter name does, with the naming conventions of GPT-2 (c_attn, c_proj under attn,
c_fc under mlp, ln_*, wte/wpe), LLaMA-style models (q/k/v/o_proj, gate/up/down_proj, *norm)
and BERT-style ones (attention, intermediate, LayerNorm).
"""
from __future__ import annotations

import re

import torch.nn as nn

KINDS = ("attention", "mlp", "norm", "embedding", "other")

_PATTERNS = [  # first match wins; order matters (e.g. "attn.c_proj" before "c_proj")
    ("norm", re.compile(r"(^|\.)(ln_?\w*|\w*norm\w*|LayerNorm)(\.|$)", re.I)),
    ("embedding", re.compile(r"(^|\.)(wte|wpe|embed\w*|tok_embeddings|word_embeddings|position_embeddings|lm_head)(\.|$)", re.I)),
    ("attention", re.compile(r"(^|\.)(attn|attention|self_attn|c_attn|[qkvo]_proj|query|key|value)(\.|$)", re.I)),
    ("mlp", re.compile(r"(^|\.)(mlp|ffn|feed_forward|c_fc|fc\d?|gate_proj|up_proj|down_proj|intermediate|w[123])(\.|$)", re.I)),
]


def kind_of(name: str, module: nn.Module | None = None) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
        return "norm"
    for kind, pat in _PATTERNS:
        if pat.search(name):
            return kind
    return "other"


def named_parameter_kinds(model: nn.Module) -> dict[str, str]:
    """{parameter name: kind} for every trainable parameter (tied weights listed once)."""
    owner = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    # a model of local shards (rl.build.LocalShards) names its trainable parameters itself: ZeRO-3's
    # partitions do not require grad, the parameters they belong to do
    trainable = (model.trainable_names() if hasattr(model, "trainable_names")
                 else {name for name, p in model.named_parameters() if p.requires_grad})
    return {name: kind_of(name, owner.get(name)) for name, _ in model.named_parameters() if name in trainable}
