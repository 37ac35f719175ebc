"""Losses: language modelling (pretrain), supervised fine-tuning, and GRPO.

GRPO (DeepSeekMath, arXiv 2402.03300), one policy-gradient step per batch of prompts:

    for each prompt, sample G completions from the policy; reward each with a verifier;
    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)             group-relative advantage
    per token: -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta KL_k3(ref || policy)
    loss = mean over completions of the mean over their tokens (up to and including <eos>)

with rho = exp(logp - logp_old) (1 on the first pass over a batch, but its gradient is the
policy gradient) and KL_k3 = exp(lr - lp) - (lr - lp) - 1 against the frozen reference model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # left padding: positions count real tokens only, as generate() does for GPT-2
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def _pack(tok, prompts: list[str], answers: list[str], train_on_prompt: bool):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = []
    for p, a in zip(prompts, answers):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ai = tok(a, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((pi + ai, (pi if train_on_prompt else [-100] * len(pi)) + ai))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # right padding: labels need no shifting games
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def lm_loss(model, tok, prompts: list[str], answers: list[str], train_on_prompt: bool) -> torch.Tensor:
    ids, labels, mask = _pack(tok, prompts, answers, train_on_prompt)
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss


def sft_loss(model, tok, examples) -> torch.Tensor:
    """Cross-entropy on the answer (and <eos>) given the prompt."""
    return lm_loss(model, tok, [e.prompt for e in examples], [e.answer for e in examples], train_on_prompt=False)


def pretrain_loss(model, tok, examples) -> torch.Tensor:
    """Plain language modelling over whole solved examples."""
    return lm_loss(model, tok, [e.prompt for e in examples], [e.answer for e in examples], train_on_prompt=True)


@dataclass
class GRPOConfig:
    group_size: int = 8  # completions per prompt
    max_new_tokens: int = 6
    temperature: float = 1.0
    clip_eps: float = 0.2
    beta: float = 0.02  # KL to the reference (0: no reference model needed)

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative to the group)")
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.clip_eps < 1 or self.beta < 0:
            raise ValueError("need max_new_tokens >= 1, temperature > 0, 0 < clip_eps < 1, beta >= 0")


def _token_logprobs(model, seq, mask, start):
    logits = model(input_ids=seq, attention_mask=mask, position_ids=_positions(mask)).logits[:, start - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, seq[:, start:].unsqueeze(-1)).squeeze(-1)


def _not_generated(tok) -> list[int] | None:
    """<pad> is never a completion token; unless it doubles as <eos> (GPT-2), which must stay."""
    pad = tok.pad_token_id
    return [pad] if pad is not None and pad != tok.eos_token_id else None


def grpo_loss(policy, ref, tok, task, examples, reward_fn, cfg: GRPOConfig, generator: torch.Generator | None = None):
    """Sample, score, and return (loss, metrics) for one GRPO step on `examples` (prompts)."""
    dev = next(policy.parameters()).device
    enc = tok([e.prompt for e in examples], return_tensors="pt", padding=True, add_special_tokens=False)
    ids, pmask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    G, start = cfg.group_size, ids.shape[1]
    sampler = getattr(policy, "module", policy)  # sample with the bare model; the loss forward goes through DDP
    was_training = sampler.training
    sampler.eval()
    with torch.no_grad():
        # <pad> never enters a sequence: it is not a completion token (suppressed), and generate() fills a
        # finished sequence's remaining steps with <eos> (everything after the first <eos> is masked
        # below, whatever its id). transformers drops an all-ones prompt mask, so a <pad> id in the
        # input made the model warn that padding went unmasked.
        if generator is not None:  # generate() draws from the global RNG: seed it from ours
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        seq = sampler.generate(input_ids=ids, attention_mask=pmask, do_sample=True, top_k=0, top_p=1.0,
                              temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                              num_return_sequences=G, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                              suppress_tokens=_not_generated(tok))
    sampler.train(was_training)
    comp = seq[:, start:]
    is_eos = comp == tok.eos_token_id
    # completion tokens count up to and including the first <eos>
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    cmask = (~after_eos).long()
    ended = is_eos.any(-1)
    texts = [tok.decode(row[m.bool() & (row != tok.eos_token_id)].tolist()).replace(" ", "") for row, m in zip(comp, cmask)]
    exs = [e for e in examples for _ in range(G)]
    rewards = torch.tensor([reward_fn(task, e, t, bool(d)) for e, t, d in zip(exs, texts, ended)], dtype=torch.float32, device=dev)
    r = rewards.view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    mask = torch.cat([pmask.repeat_interleave(G, 0), cmask], 1)
    lp = _token_logprobs(policy, seq, mask, start)
    ratio = torch.exp(lp - lp.detach())
    per_tok = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
    kl = torch.zeros_like(lp)
    if cfg.beta > 0 and ref is not None:
        with torch.no_grad():
            ref_lp = _token_logprobs(ref, seq, mask, start)
        d = ref_lp - lp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + cfg.beta * kl
    cm = cmask.float()
    loss = ((per_tok * cm).sum(-1) / cm.sum(-1).clamp_min(1)).mean()
    with torch.no_grad():
        metrics = {"train/reward": float(rewards.mean()),
                   "train/accuracy": sum(task.correct(e, t) for e, t in zip(exs, texts)) / len(texts),
                   "train/kl": float((kl.detach() * cm).sum() / cm.sum().clamp_min(1)),
                   "train/completion_tokens": float(cm.sum(-1).mean()), "train/loss": float(loss.detach())}
    return loss, metrics


@torch.no_grad()
def evaluate(policy, tok, task, examples, max_new_tokens: int) -> float:
    """Greedy exact-match accuracy."""
    dev = next(policy.parameters()).device
    enc = tok([e.prompt for e in examples], return_tensors="pt", padding=True, add_special_tokens=False)
    was = policy.training
    policy.eval()
    # no <pad> in completions; finished sequences are filled with <eos> (see grpo_loss), cut at the first
    seq = policy.generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                          suppress_tokens=_not_generated(tok))
    policy.train(was)
    comp = seq[:, enc["input_ids"].shape[1]:]
    texts = [tok.decode(row.tolist()).split(tok.eos_token)[0].replace(" ", "").replace(tok.pad_token, "") for row in comp]
    return sum(task.correct(e, t) for e, t in zip(examples, texts)) / len(examples)
