"""Task definitions shared by every benchmark that uses the real SmolLM2-135M fine-tunes.

Each task has a deterministic training set and a disjoint held-out evaluation set, a
maximum number of new tokens, and an exact-match scorer.

Prompt format (the same for training, transformers evaluation and vLLM serving): the
SmolLM2-Instruct chat markers with one user turn and NO system turn:

    <|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n

`render_prompt(question)` returns exactly this string: send it to `/v1/completions` (the
SmolLM2 tokenizer adds no BOS token, so the server sees the same tokens as training). Do
not use `/v1/chat/completions`: SmolLM2's chat template always inserts its default system
prompt, which these fine-tunes never saw (it would also double the sequence length and the
CPU cost of training). The prompt is short on purpose: a training step costs in
proportion to the tokens on this CPU.

Target format: the assistant replies with the bare answer and ends its turn
(`<answer><|im_end|>`); training puts the loss on those tokens only. Scoring is exact match
of `parse_answer(completion)` (first line, stripped) with the reference answer. The base
model answers in sentences and scores near zero; a fine-tune scores by computing the
answer in its first line.

Tasks (reasoning-gym 0.1.25 generators, pinned in the `bench` extra):
- `arithmetic`: `basic_arithmetic`, a + b or a - b with a, b in 0..100, e.g.
  "Calculate 58 + 98." -> "156", "Calculate 12 - 85." -> "-73".
- `word_reversal`: `word_sequence_reversal`, 3 to 5 words from a novel, question shortened
  to its last line, e.g. "Reverse this list of words: hundred, go, acute, Foundation" ->
  "Foundation, acute, go, hundred".
- `spell_backward`: `spell_backward`, a 3-6 letter word spelled backward, e.g. "Spell this
  word backward (example: sun -> nus): splat" -> "talps" (a character-level skill the base
  lacks; the fourth, heavier fine-tune of issue #13).

Held-out sets: the first `N_EVAL` distinct problems from a fixed seed. Training sets come
from a different, distant seed (reasoning-gym item i of seed s equals item i - d of seed
s + d, so nearby seeds overlap) and drop every problem whose question occurs in the
held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

END_OF_TURN = "<|im_end|>"

N_EVAL = 200          # held-out problems per task (benchmarks may use a prefix)
EVAL_SEED = 10_000_000
TRAIN_SEED = 50_000_000


def render_prompt(question: str) -> str:
    """The prompt for one question: a user turn (no system turn), then the assistant header."""
    return (f"<|im_start|>user\n{question}{END_OF_TURN}\n"
            f"<|im_start|>assistant\n")


def target_text(answer: str) -> str:
    """What the fine-tune is trained to generate after the prompt (answer + end of turn)."""
    return f"{answer}{END_OF_TURN}"


def parse_answer(completion: str) -> str:
    """The answer in a completion: its first non-empty line, stripped (end-of-turn removed)."""
    text = completion.replace(END_OF_TURN, "\n").strip()
    return text.split("\n", 1)[0].strip() if text else ""


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return render_prompt(self.question)


@dataclass(frozen=True, eq=False)
class Task:
    name: str
    rg_name: str                  # reasoning-gym dataset name
    rg_config: dict = field(default_factory=dict)
    max_new_tokens: int = 16
    description: str = ""
    last_line_only: bool = False  # shorten the generator's question to its last line

    def _generate(self, seed: int, size: int) -> list[Problem]:
        import reasoning_gym  # bench extra

        ds = reasoning_gym.create_dataset(self.rg_name, size=size, seed=seed, **self.rg_config)
        out = []
        for x in ds:
            q = x["question"].strip()
            if self.last_line_only:
                q = q.split("\n")[-1].strip()
            out.append(Problem(self.name, q, str(x["answer"])))
        return out

    def eval_set(self, n: int = N_EVAL) -> list[Problem]:
        """The held-out problems (first n of N_EVAL; distinct questions)."""
        if n > N_EVAL:
            raise ValueError(f"at most {N_EVAL} held-out problems per task")
        return list(_eval_set(self))[:n]

    def train_set(self, n: int) -> list[Problem]:
        """n training problems; none shares a question with the held-out set.

        Duplicates within training are allowed (as in sampled SFT data)."""
        held = _eval_set(self)
        banned = {p.question for p in held}
        out: list[Problem] = []
        size = n
        while len(out) < n:
            out = [p for p in self._generate(TRAIN_SEED, 2 * size)
                   if p.question not in banned][:n]
            size *= 2
        return out

    def score(self, completion: str, problem: Problem) -> bool:
        """Exact match of the parsed answer (case-sensitive)."""
        return parse_answer(completion) == problem.answer


def _distinct(task: Task, n: int, banned=frozenset()) -> list[Problem]:
    """The first n distinct questions of the held-out seed that are not in `banned` (fewer
    where the task has fewer). Items are fixed by their index, so generating more only
    appends: the size doubles until n are found or no more appear."""
    size, last = 2 * (n + len(banned)), -1
    while True:
        seen, out = set(), []
        for p in task._generate(EVAL_SEED, size):
            if p.question not in seen and p.question not in banned:
                seen.add(p.question)
                out.append(p)
        if len(out) >= n or len(out) == last or size >= 64 * (n + len(banned)):
            return out[:n]
        last, size = len(out), size * 2


@lru_cache(maxsize=None)
def _eval_set(task: Task) -> tuple[Problem, ...]:
    return tuple(_distinct(task, N_EVAL))


def extended_eval_set(task: Task, n: int, exclude=()) -> list[Problem]:
    """n more held-out problems, for estimates tighter than N_EVAL allows: the next distinct
    questions of the held-out seed, none of them in the held-out set (so the two can be
    pooled) nor in `exclude` (a fine-tune's training questions: the held-out set is
    disjoint from every training set by construction, these are not). Fewer than n where
    the task has fewer such questions (short words spelled backward)."""
    return _distinct(task, n, {p.question for p in _eval_set(task)} | set(exclude))


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        name="arithmetic",
        rg_name="basic_arithmetic",
        rg_config=dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2,
                       operators=("+", "-"), allow_parentheses=False, allow_negation=False,
                       whitespace="single"),
        max_new_tokens=8,
        description="a + b or a - b with a, b in 0..100; the answer is the integer",
    ),
    "word_reversal": Task(
        name="word_reversal",
        rg_name="word_sequence_reversal",
        rg_config=dict(min_words=3, max_words=5),
        max_new_tokens=32,
        description="reverse a comma-separated list of 3-5 words",
        last_line_only=True,
    ),
    "spell_backward": Task(
        name="spell_backward",
        rg_name="spell_backward",
        rg_config=dict(min_word_len=3, max_word_len=6),
        max_new_tokens=12,
        description="spell a 3-6 letter word backward (a character-level skill)",
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


def score_completions(task: str | Task, completions: list[str],
                      problems: list[Problem]) -> float:
    """Accuracy (0..1) of completions against problems."""
    t = get_task(task) if isinstance(task, str) else task
    if len(completions) != len(problems):
        raise ValueError("completions and problems differ in length")
    return sum(t.score(c, p) for c, p in zip(completions, problems)) / max(1, len(problems))
