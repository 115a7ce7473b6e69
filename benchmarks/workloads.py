"""The benchmark workloads: the same prompts and output lengths for every system."""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = [
    "queue", "engine", "batch", "token", "model", "worker", "result", "redis", "celery",
    "request", "answer", "prompt", "stream", "cache", "shard", "fleet",
]


@dataclass(frozen=True)
class Workload:
    """Prompts and the number of tokens to generate for each."""

    name: str
    prompts: list[str]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def prompts(n: int, seed: int = 7) -> list[str]:
    """n distinct prompts of 8 to 40 words."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 40))) for i in range(n)]


def workloads(n: int = 1024) -> list[Workload]:
    rng = random.Random(11)
    ps = prompts(n)
    return [
        Workload(f"{n}x32", ps, [32] * n),
        Workload(f"{n}x1", ps, [1] * n),
        Workload(f"{n}xmixed", ps, [rng.randint(1, 256) for _ in range(n)]),
    ]
