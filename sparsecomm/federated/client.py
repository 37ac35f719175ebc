"""Client side of federated RL: E local GRPO steps from the global model, then the top-k of the
model change with client-side error feedback, encoded by sparsecomm's codec.

    trainer = LocalTrainer(cfg, data)                 # one client's prompts, task(s) and policy
    new, metrics = trainer.train(global_state, rnd)   # {name: tensor} after E local steps
    up = Uplink(cfg.density_up, cfg.selector, cfg.value_codec_up)
    payload = up.encode(change(new, global_state), rnd, version)   # bytes (SPCD message)

The residual wraps the quantity that is compressed, the model change w_local - w_global (the
pseudo-gradient FedAvg averages), so nothing a round leaves out is lost: it is uploaded in a
later round (DGC/EF-SGD applied to FedAvg's pseudo-gradient). If an upload never arrives (the
client was dropped after it sent), that round's sent part is lost; the rest stays in the residual.
FedProx (arXiv 1812.06127) adds mu/2 ||w - w_global||^2 to every local loss.

Downlink messages carry the version they lead to; `apply_downlinks` skips those a client already
applied, so a server may resend after a lost reply without double-applying anything.
"""
from __future__ import annotations

import random

import torch

from ..codec import decode_model, encode_model, roundtrip_values
from ..compress import ErrorFeedback, k_for, make_selector
from ..rl.losses import evaluate, grpo_loss
from ..rl.models import build_model, char_tokenizer
from ..rl.tasks import make_reward, make_task
from .config import FedConfig
from .split import ClientData

State = dict[str, torch.Tensor]


def model_state(model) -> State:
    """The trainable tensors by name (GPT-2's tied lm_head appears once, as transformer.wte)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load_state(model, state: State) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])


def to_wire(state: State, layout: str) -> State:
    """The tensors as they travel: one flat "model" tensor (parameter order), or per parameter."""
    if layout == "per_tensor":
        return {n: t.clone() for n, t in state.items()}
    return {"model": torch.cat([t.reshape(-1) for t in state.values()])}


def from_wire(wire: State, like: State, layout: str) -> State:
    """Inverse of to_wire, shapes taken from `like`."""
    if layout == "per_tensor":
        return {n: wire[n].clone() for n in like}
    parts = torch.split(wire["model"], [t.numel() for t in like.values()])
    return {n: p.reshape(t.shape).clone() for (n, t), p in zip(like.items(), parts)}


def change(new: State, base: State) -> State:
    return {n: new[n] - base[n] for n in base}


def _seed(*parts: int) -> int:
    """A seed from integers that is the same in every process (no hash(), no global RNG)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**31 - 1)
    return s


class LocalTrainer:
    """One client's policy, prompts and local optimizer; deterministic given (seed, client, round)."""

    def __init__(self, cfg: FedConfig, data: ClientData):
        self.cfg, self.data = cfg, data
        torch.set_num_threads(1)  # deterministic and fair: clients share 2 cores in the simulation
        self.tok = char_tokenizer()
        self.model, _ = build_model(cfg.model, self.tok, seed=cfg.seed)
        self.grpo = cfg.grpo_config
        self.reward = make_reward(cfg.reward)
        self.tasks = {t: make_task(t, **cfg.task_kwargs.get(t, {})) for t in data.tasks}
        self.prompts = {t: data.examples(t, cfg.task_kwargs.get(t, {}), cfg.prompts_per_client, _seed(cfg.seed, data.client, i))
                        for i, t in enumerate(data.tasks)}

    @staticmethod
    def warm_up() -> None:
        """Pay the one-time costs (transformers import, tokenizer build) before a round's clock starts."""
        build_model("tiny", char_tokenizer())

    def loss(self, batch_seed: int):
        """One GRPO batch: (loss, metrics). Each step draws one of the client's tasks, then prompts of it."""
        rng = random.Random(batch_seed)
        name = rng.choice(list(self.data.tasks))
        batch = rng.sample(self.prompts[name], self.cfg.prompts_per_step)
        gen = torch.Generator().manual_seed(batch_seed)
        return grpo_loss(self.model, None, self.tok, self.tasks[name], batch, self.reward, self.grpo, gen)

    def train(self, global_state: State, rnd: int) -> tuple[State, dict]:
        cfg = self.cfg
        load_state(self.model, global_state)
        self.model.train()
        params = [p for _, p in self.model.named_parameters()]
        opt = (torch.optim.Adam(params, lr=cfg.local_lr) if cfg.local_optimizer == "adam"
               else torch.optim.SGD(params, lr=cfg.local_lr))
        anchor = [global_state[n] for n, _ in self.model.named_parameters()]
        rewards = []
        for step in range(cfg.local_steps):
            loss, m = self.loss(_seed(cfg.seed, self.data.client, rnd, step))
            if cfg.mu > 0:  # FedProx's proximal term keeps the local model near the round's global model
                loss = loss + 0.5 * cfg.mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            opt.zero_grad()
            loss.backward()
            opt.step()
            rewards.append(m["train/reward"])
        return model_state(self.model), {"train_reward": sum(rewards) / len(rewards),
                                         "num_examples": cfg.local_steps * cfg.prompts_per_step}


class Uplink:
    """Client-side error feedback + selection + codec for the model change."""

    def __init__(self, density: float, selector: str = "topk", value_codec: str = "fp32"):
        self.density, self.value_codec = density, value_codec
        self.selector = make_selector(selector)
        self.ef = ErrorFeedback()

    def encode(self, delta: State, rnd: int, version: int) -> bytes:
        sent = {}
        for name, u in delta.items():
            e = self.ef.compensate(name, u)                      # e += change (this round's pseudo-gradient)
            d = self.selector.select(e, k_for(e.numel(), self.density))
            d = roundtrip_values(d, self.value_codec)            # exactly what the server will decode
            self.ef.update(name, d)                              # e -= sent: the rest waits for later rounds
            sent[name] = d
        return encode_model(sent, value=self.value_codec, step=rnd, base_version=version)


def apply_downlinks(state: State, version: int, messages: list[bytes]) -> int:
    """Apply, in order, the downlink messages this client has not applied yet; return its new version.

    Each message's header says base (the version it applies to) and step (the version it leads
    to). A gap (a message whose base is past the client's version) is an error: the client would
    silently diverge from the server."""
    for buf in messages:
        deltas = decode_model(buf)
        first = next(iter(deltas.values()), None)
        base, to = (first.base_version, first.step) if first is not None else (version, version)
        if to <= version:
            continue  # already applied (a resend after a lost reply)
        if base != version:
            raise ValueError(f"downlink gap: message applies to version {base} but this client is at {version}")
        for name, d in deltas.items():
            if name not in state:
                raise ValueError(f"downlink names tensor {name!r} that this model does not have")
            d.add_to(state[name])
        version = to
    return version


def evaluate_state(trainer: LocalTrainer, state: State, examples_by_task: dict) -> dict[str, float]:
    """Greedy exact-match accuracy of `state` on held-out examples, per task."""
    load_state(trainer.model, state)
    out = {}
    for name, exs in examples_by_task.items():
        task = make_task(name, **trainer.cfg.task_kwargs.get(name, {}))
        out[name] = evaluate(trainer.model, trainer.tok, task, exs, trainer.grpo.max_new_tokens)
    return out
