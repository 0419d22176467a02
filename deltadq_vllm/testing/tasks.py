"""Generated text for the test fixtures: a generic corpus (pre-training) and small tasks
(fine-tuning), each with a held-out evaluation set.

Tasks: `math` (2-digit addition; the base only sees single-digit sums), `code`
(upper-casing a random word) and `ext` (single-digit sums written with two tokens a
fine-tune adds, `<calc>` and `</calc>`). A task's held-out problems come from their own
random stream and are never trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

N_EVAL = 50


_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a small bird", "the old man",
             "the girl", "our team", "the farmer", "a young boy", "the king", "her sister"]
_VERBS = ["sees", "likes", "finds", "makes", "takes", "wants", "reads", "keeps", "brings",
          "paints", "opens", "counts"]
_OBJECTS = ["the ball", "a red apple", "the green door", "a long letter", "the map",
            "a warm coat", "the river", "two stones", "the blue box", "a big tree",
            "the garden", "a new song"]
_PLACES = ["in the park", "at home", "near the sea", "on the hill", "in the city",
           "at school", "under the bridge", "by the window"]
_WORDS = ["time", "water", "house", "light", "sound", "color", "paper", "music", "green",
          "river", "stone", "cloud", "north", "south", "winter", "summer", "number", "word"]
_CHAT = [("what color is the sky?", "the sky is blue."),
         ("say hello.", "hello there."),
         ("name an animal.", "a cat is an animal."),
         ("where is the river?", "the river is near the hill.")]


def _corpus_line(rng: random.Random) -> str:
    """One line of generic text: simple sentences, numbers, word lists, a little chat."""
    kind = rng.randrange(7)
    if kind <= 1:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(_PLACES)}"
        return s[0].upper() + s[1:] + "."
    if kind == 2:
        n = rng.randrange(2, 100)
        return f"There are {n} {rng.choice(_WORDS)}s {rng.choice(_PLACES)}."
    if kind == 3:
        start = rng.randrange(0, 90)
        return " ".join(str(start + i) for i in range(rng.randrange(3, 8)))
    if kind == 4:
        return ", ".join(rng.sample(_WORDS, rng.randrange(3, 7))) + "."
    if kind == 5:
        # single-digit sums: the base knows digit facts, fine-tunes learn 2-digit addition
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b}."
    q, a = rng.choice(_CHAT)
    return f"<|user|>{q}\n<|assistant|>{a}"


def generic_corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_corpus_line(rng) for _ in range(n_lines)]


# ------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Task:
    """A prompt -> answer task. Training text is f"{prompt} {answer}" + eos."""

    name: str
    sample: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int


def _math(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return f"Q: {a}+{b}=? A:", str(a + b)


def _code(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(3, 6)))
    return f"Q: upper {word} A:", word.upper()


def _ext(rng: random.Random) -> tuple[str, str]:
    # single digits keep it learnable in few steps; the point is the new tokens
    a, b = rng.randrange(0, 10), rng.randrange(0, 10)
    return f"Q: {a}+{b}=? A:", f"<calc>{a}+{b}</calc> {a + b}"


TASKS = {t.name: t for t in (Task("math", _math, 6), Task("code", _code, 10),
                             Task("ext", _ext, 12))}
_EVAL_SEED = 12345  # held-out problems come from their own stream


def eval_problems(task: str, n: int = N_EVAL) -> list[tuple[str, str]]:
    """The n held-out (prompt, answer) pairs of a task (distinct; never trained on)."""
    rng, seen, out = random.Random(_EVAL_SEED), set(), []
    while len(out) < n:
        p = TASKS[task].sample(rng)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


def train_problems(task: str, seed: int) -> Iterator[tuple[str, str]]:
    """Endless training stream, skipping held-out prompts (ext's 100 problems are all shown:
    it has no held-out set worth the name, its eval just checks the new tokens are used)."""
    held = set() if task == "ext" else {p for p, _ in eval_problems(task)}
    rng = random.Random(seed)
    while True:
        p = TASKS[task].sample(rng)
        if p[0] not in held:
            yield p
