"""Procedurally generated tasks with verifiable rewards, and the plan's reward variants.

Each task gives, from a seed: a pretraining corpus (whole solved examples), an SFT set
(prompt -> answer) and RL prompts (with the information to verify an answer).

| task      | prompt      | answer | verifier                        |
|-----------|-------------|--------|---------------------------------|
| addition  | "47+38="    | "85"   | integer equality                |
| sort      | "sort 3920=" | "0239" | sorted digits                  |
| countdown | "3,5,7 to 22=" | "3*5+7" | expression uses each number once and evaluates to the target |

Reward variants (rule-based stand-ins for the research plan's reward models; documented so the
numbers mean something):

    truthful   correctness: 1 for an exact answer; else the fraction of answer characters right
               in position (partial credit, so a small policy gets a gradient)
    helpful    format: 1 if the completion is non-empty, uses only the answer alphabet and ends
               with <eos> within the budget; 0 otherwise
    harmless   0 if the completion contains a forbidden character (default: any letter); else 1
    default    truthful, with 0.1 x helpful as shaping

A user reward is any callable `(task, example, completion, ended) -> float` (for example a local
reward model wrapped in one); pass it where a reward name is accepted.
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    meta: tuple = ()


class ExactAnswer:
    """Tasks whose only correct completion is the reference answer."""

    def correct(self, ex: Example, completion: str) -> bool:
        return completion == ex.answer


class Addition(ExactAnswer):
    name = "addition"
    alphabet = set("0123456789")

    def __init__(self, digits: int = 2):
        self.digits = digits

    def example(self, rng: random.Random) -> Example:
        hi = 10 ** self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return Example(f"{a:0{self.digits}d}+{b:0{self.digits}d}=", str(a + b), (a, b))


class SortDigits(ExactAnswer):
    name = "sort"
    alphabet = set("0123456789")

    def __init__(self, length: int = 4):
        self.length = length

    def example(self, rng: random.Random) -> Example:
        s = "".join(rng.choice("0123456789") for _ in range(self.length))
        return Example(f"sort {s}=", "".join(sorted(s)), (s,))


class Countdown:
    name = "countdown"
    alphabet = set("0123456789+-*()")

    def __init__(self, n: int = 3):
        self.n = n

    def example(self, rng: random.Random) -> Example:
        nums = [rng.randint(1, 9) for _ in range(self.n)]
        ops = [rng.choice("+-*") for _ in range(self.n - 1)]
        expr = str(nums[0]) + "".join(o + str(x) for o, x in zip(ops, nums[1:]))
        return Example(f"{','.join(map(str, nums))} to {eval(expr)}=", expr, (tuple(nums), eval(expr)))  # noqa: S307

    def correct(self, ex: Example, completion: str) -> bool:
        nums, target = ex.meta
        if not re.fullmatch(r"[0-9+\-*()]{1,40}", completion):
            return False
        if sorted(int(x) for x in re.findall(r"\d+", completion)) != sorted(nums):
            return False
        try:
            return eval(completion, {"__builtins__": {}}) == target  # noqa: S307 (digits and + - * ( ) only)
        except Exception:
            return False


TASKS = {"addition": Addition, "sort": SortDigits, "countdown": Countdown}


def make_task(name: str, **kw):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kw)


def datasets(task, seed: int, n_pretrain: int = 2000, n_sft: int = 2000, n_rl: int = 2000,
             heldout_fraction: float = 0.0) -> dict[str, list[Example]]:
    """Training examples from `seed`. With heldout_fraction > 0, prompts in the held-out part of the
    prompt space (`is_heldout`) are skipped: no training split ever contains an evaluation prompt."""
    rng = random.Random(seed)

    def draw() -> Example:
        while True:
            ex = task.example(rng)
            if not is_heldout(ex.prompt, heldout_fraction):
                return ex

    return {split: [draw() for _ in range(n)] for split, n in (("pretrain", n_pretrain), ("sft", n_sft), ("rl", n_rl))}


def is_heldout(prompt: str, fraction: float) -> bool:
    """Whether `prompt` lies in the held-out part of the prompt space: a fixed hash of the prompt text
    (CRC-32, the same in every process and run), so the split needs no list and holds for any seed."""
    return fraction > 0 and zlib.crc32(prompt.encode()) % 10_000 < round(fraction * 10_000)


def heldout_set(task, seed: int, n: int, fraction: float, max_draws: int = 1_000_000) -> list[Example]:
    """`n` distinct held-out prompts (greedy exact-match evaluation set), disjoint from every training
    split that `datasets(..., heldout_fraction=fraction)` draws. Refuses a task whose held-out part
    has fewer than n distinct prompts within max_draws draws."""
    if not 0 < fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1) for a held-out set, got {fraction}")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(max_draws):
        ex = task.example(rng)
        if ex.prompt not in seen and is_heldout(ex.prompt, fraction):
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct held-out prompts of {task.name} found in {max_draws} draws "
                     f"(wanted {n}): raise heldout_fraction or pick a larger task")


# ------------------------------------------------------------------------------- rewards

def truthful(task, ex: Example, completion: str) -> float:
    if task.correct(ex, completion):
        return 1.0
    if not ex.answer:
        return 0.0
    hits = sum(a == b for a, b in zip(completion, ex.answer))
    return 0.5 * hits / max(len(ex.answer), len(completion))  # partial credit stays below an exact answer


def helpful(task, ex: Example, completion: str, ended: bool = True) -> float:
    return float(bool(completion) and ended and set(completion) <= task.alphabet)


def harmless(task, ex: Example, completion: str, forbidden: str = "abcdefghijklmnopqrstuvwxyz") -> float:
    return 0.0 if any(c in forbidden for c in completion) else 1.0


def default_reward(task, ex, completion, ended=True) -> float:
    return truthful(task, ex, completion) + 0.1 * helpful(task, ex, completion, ended)


REWARDS: dict[str, Callable] = {
    "default": default_reward,
    "truthful": lambda t, e, c, ended=True: truthful(t, e, c),
    "helpful": helpful,
    "harmless": lambda t, e, c, ended=True: harmless(t, e, c),
}


def make_reward(name_or_fn) -> Callable:
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in REWARDS:
        raise ValueError(f"unknown reward {name_or_fn!r}; choose from {sorted(REWARDS)} or pass a callable")
    return REWARDS[name_or_fn]
