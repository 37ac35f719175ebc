"""Policies: built-in tiny GPT-2s with a character tokenizer (offline), or real checkpoints.

    tok = char_tokenizer()                       # tokenizers WordLevel wrapped in PreTrainedTokenizerFast
    model = build_model("tiny", tok)             # random init from a config: no download
    model = build_model("gpt2", None)            # a local path or the HF cache; clear error if absent

| name   | layers | width | heads | ~parameters |
|--------|--------|-------|-------|-------------|
| tiny   | 2      | 64    | 2     | 0.1M        |
| small  | 4      | 128   | 4     | 0.8M        |
| medium | 6      | 384   | 6     | 10.7M       |

Real checkpoints are loaded with `local_files_only=True`: nothing is downloaded at run time,
and a missing model raises ModelNotAvailable naming what was looked for, instead of hanging on
the network.
"""
from __future__ import annotations

CHARS = list("0123456789+-*=(), ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]
BUILTIN = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2),
    "small": dict(n_layer=4, n_embd=128, n_head=4),
    "medium": dict(n_layer=6, n_embd=384, n_head=6),
}


class ModelNotAvailable(RuntimeError):
    pass


def char_tokenizer():
    """A character-level tokenizer built in code: one token per character, plus <pad>/<eos>/<unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character is a token
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"  # generation continues from the right end of the prompt
    return tok


def disable_dropout(model) -> None:
    """RL needs deterministic log-probs: the policy's and the reference's must be comparable."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def build_model(name: str, tokenizer=None, n_positions: int = 64, seed: int = 0):
    """A built-in config (random init) or a checkpoint from a local path / the HF cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if name in BUILTIN:
        if tokenizer is None:
            raise ValueError(f"built-in model {name!r} needs the tokenizer it will be used with")
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **BUILTIN[name])
        return GPT2LMHeadModel(cfg), tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
        tok = tokenizer or AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotAvailable(
            f"model {name!r} is neither a built-in config ({', '.join(BUILTIN)}) nor available locally "
            f"(a directory with config.json and weights, or the Hugging Face cache); nothing is downloaded "
            f"at run time. Underlying error: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    disable_dropout(model)
    return model, tok
