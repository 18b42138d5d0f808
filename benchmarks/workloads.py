"""Seeded, deterministic workloads: the same inputs for every router under test."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_WORDS = ("adventure", "lantern", "mailbox", "forest", "river", "castle", "dragon", "sword", "treasure", "maze",
          "door", "window", "kitchen", "attic", "cellar", "bridge", "troll", "thief", "lamp", "leaflet", "north",
          "south", "east", "west", "open", "close", "take", "drop", "read", "climb", "enter", "exit")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


@dataclass
class Conversation:
    """One user's chat: a group's system prompt, then questions turn by turn."""

    group: int
    user: int
    system: str
    questions: list[str]
    messages: list[dict[str, str]] = field(default_factory=list)  # the history so far, answers included

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = [{"role": "system", "content": self.system}]


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """G groups x U users: a long system prompt per group, per-user questions, conversations that grow.

    Each of the workloads' words is one or two tokens of the simulator's tokenizer (SmolLM2's): about
    1.3 tokens a word.
    """

    groups: int = 8
    users: int = 6
    turns: int = 8
    system_words: int = 1500
    question_words: int = 60
    max_tokens: int = 32
    seed: int = 7

    def conversations(self) -> list[Conversation]:
        rng = random.Random(self.seed)
        systems = [f"Group {g} rules. " + _text(rng, self.system_words) for g in range(self.groups)]
        return [Conversation(g, u, systems[g],
                             [f"User {g}.{u} turn {t}: " + _text(rng, self.question_words) for t in range(self.turns)])
                for g in range(self.groups) for u in range(self.users)]


@dataclass(frozen=True)
class StressWorkload:
    """The seeds' stress shape: `--random-prefix-len 10 --random-input-len 1550 --random-output-len 1800
    --random-range-ratio 0.2`, concurrency-limited, scaled by `prompts` and `concurrency`."""

    prompts: int = 96
    prefix_words: int = 10
    input_words: int = 1550
    output_tokens: int = 1800
    range_ratio: float = 0.2
    seed: int = 11

    def conversations(self) -> list[Conversation]:
        rng = random.Random(self.seed)
        prefix = _text(rng, self.prefix_words)
        low, high = int(self.input_words * (1 - self.range_ratio)), int(self.input_words * (1 + self.range_ratio))
        return [Conversation(0, i, "", [prefix + " " + _text(rng, rng.randint(low, high))])
                for i in range(self.prompts)]

    def max_tokens(self, rng: random.Random) -> int:
        return rng.randint(int(self.output_tokens * (1 - self.range_ratio)),
                           int(self.output_tokens * (1 + self.range_ratio)))


@dataclass(frozen=True)
class HotPrefixWorkload:
    """Half of all requests share one hot system prompt; the other half share nothing."""

    requests: int = 240
    system_words: int = 2000
    question_words: int = 80
    max_tokens: int = 32
    seed: int = 13

    def conversations(self) -> list[Conversation]:
        rng = random.Random(self.seed)
        hot = "Hot assistant rules. " + _text(rng, self.system_words)
        out = []
        for i in range(self.requests):
            system = hot if i % 2 == 0 else f"Cold {i}. " + _text(rng, self.system_words)
            out.append(Conversation(i % 2, i, system, [f"Question {i}: " + _text(rng, self.question_words)]))
        return out


@dataclass(frozen=True)
class CachedWorkload:
    """Short questions under a few long system prompts, after a warm-up: nearly every prompt is cached.

    Run on pods at time scale 1, where a cached prompt's first token takes a few
    milliseconds, so what each request costs the router shows in its TTFT. The
    system prompts come from `prompt_seed`, the questions from `seed`: a warm-up
    built with another `seed` fills the caches with the same prompts.
    """

    requests: int = 900
    groups: int = 8
    system_words: int = 1000
    question_words: int = 12
    max_tokens: int = 4
    prompt_seed: int = 19
    seed: int = 23

    def conversations(self) -> list[Conversation]:
        prompts = random.Random(self.prompt_seed)
        systems = [f"Cached group {g} rules. " + _text(prompts, self.system_words) for g in range(self.groups)]
        rng = random.Random(self.seed)
        return [Conversation(i % self.groups, i, systems[i % self.groups],
                             [f"Question {i}: " + _text(rng, self.question_words)]) for i in range(self.requests)]


@dataclass(frozen=True)
class CachePressureWorkload:
    """More distinct shared prefixes than the pool's KV caches hold: G groups of U users, each group's
    long system prompt shared by its users, conversations that come back turn after turn. Turns arrive at
    random among the idle conversations, so a session often returns after its prefix was evicted to make
    room for others; the benchmark also restarts one pod mid-run (its cache emptied).

    With the profile's caches (8 pods of 600 blocks of 16 tokens: 76,800 tokens) the 160 prefixes of about
    850 tokens each (136,000 tokens, before the conversations grow) do not all fit.
    """

    groups: int = 160
    users: int = 3
    turns: int = 4
    system_words: int = 760
    question_words: int = 30
    max_tokens: int = 16
    seed: int = 29

    def conversations(self) -> list[Conversation]:
        rng = random.Random(self.seed)
        systems = [f"Pressure group {g} rules. " + _text(rng, self.system_words) for g in range(self.groups)]
        return [Conversation(g, u, systems[g],
                             [f"User {g}.{u} turn {t}: " + _text(rng, self.question_words) for t in range(self.turns)])
                for g in range(self.groups) for u in range(self.users)]
