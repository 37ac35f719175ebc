"""Seed-fixed client data: IID (every client sees every task and digit) or non-IID (one task and
one range of leading digits per client).

The leading digit of a prompt ("7+3=", "sort 402=", "3,5,7 to 22=") is the digit range key for
every task, so the split needs no per-task code: a client's prompts are the task's own examples
(sparsecomm.rl.tasks) filtered by that key. With T tasks and C clients, non-IID client c gets task
c mod T and the (c div T)-th of ceil(C/T) contiguous slices of the digits 0-9 (a permutation drawn
from `seed` decides which client gets which slot).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..rl.tasks import Example, make_task

DIGITS = "0123456789"


def leading_digit(prompt: str) -> str:
    return next((c for c in prompt if c.isdigit()), "")


@dataclass(frozen=True)
class ClientData:
    """What client `client` trains and is evaluated on."""

    client: int
    tasks: tuple[str, ...]
    digits: str  # leading digits the client's prompts may start with

    def examples(self, task_name: str, task_kwargs: dict, n: int, seed: int) -> list[Example]:
        """n examples of one task whose prompt starts with one of `digits` (rejection sampling)."""
        task = make_task(task_name, **task_kwargs)
        rng = random.Random(seed)
        out, tries = [], 0
        while len(out) < n:
            ex = task.example(rng)
            tries += 1
            if leading_digit(ex.prompt) in self.digits:
                out.append(ex)
            elif tries > 1000 * n:
                raise ValueError(f"client {self.client}: task {task_name!r} yields no prompts with leading digit in {self.digits!r}")
        return out


def split_clients(n_clients: int, tasks: tuple[str, ...], mode: str, seed: int) -> list[ClientData]:
    """The seed-fixed split, one ClientData per client."""
    if mode == "iid":
        return [ClientData(c, tuple(tasks), DIGITS) for c in range(n_clients)]
    if mode != "noniid":
        raise ValueError(f"split {mode!r} is not iid or noniid")
    T = len(tasks)
    groups = max(1, math.ceil(n_clients / T))
    if groups > len(DIGITS):
        raise ValueError(f"{n_clients} non-IID clients over {T} tasks need {groups} digit ranges; at most 10 exist")
    bounds = [round(g * len(DIGITS) / groups) for g in range(groups + 1)]
    slots = [(tasks[c % T], DIGITS[bounds[c // T]:bounds[c // T + 1]]) for c in range(n_clients)]
    random.Random(seed).shuffle(slots)
    return [ClientData(c, (task,), digits) for c, (task, digits) in enumerate(slots)]
