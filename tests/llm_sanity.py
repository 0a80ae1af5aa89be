"""What any sane build of the small chat model gets right: questions with checkable answers.

SmolLM2-135M is tiny and its exact words depend on the llama.cpp build (the lock pins it), so no
single answer is asserted: most of these must be right.  The locked build answers all seven.
"""

from __future__ import annotations

from collections.abc import Callable

#: (question, words of which one must appear in the answer, lower-cased)
PROBES: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("How many days are in a week?", ("7", "seven")),
    ("What is the largest ocean on Earth?", ("pacific",)),
]
#: How many of them must be right.
NEEDED = 5


def check_sane(ask: Callable[[str], str]) -> list[str]:
    """Ask every probe; assert that at least ``NEEDED`` answers hold their word.  Returns them."""
    answers = [ask(question) for question, _ in PROBES]
    right = [
        any(word in answer.lower() for word in words)
        for answer, (_, words) in zip(answers, PROBES, strict=True)
    ]
    report = "\n".join(
        f"{'ok ' if ok else 'BAD'} {q!r} -> {a!r}"
        for ok, a, (q, _) in zip(right, answers, PROBES, strict=True)
    )
    assert sum(right) >= NEEDED, f"only {sum(right)} of {len(PROBES)} sane answers:\n{report}"
    assert all(a.strip() for a in answers), f"an empty answer:\n{report}"
    return answers
