"""Prompt sets the benchmarks share: real questions, and token-exact prompts of chosen lengths."""

from __future__ import annotations

import random

from dist_infer.planner.metrics import percentile  # noqa: F401  (the benchmarks' shared percentile)

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a transformer language model generates text, step by step, for a beginner.",
    "List three uses of Python.",
    "Once upon a time",
    "Summarize the plot of Romeo and Juliet in two sentences, and then say what the play teaches us about haste.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish, French and German.",
    "What are prime numbers?",
    "Describe the water cycle.",
    "Give me a recipe for pancakes with blueberries and maple syrup, with quantities for four people.",
    "Why is the sky blue?",
    "def quicksort(arr):",
    "The most important invention of the 20th century was",
    "Compare cats and dogs as pets.",
    "What is 17 times 23?",
]

_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring them; "
    "stored programs let the same hardware run many tasks; compilers let people write for ideas rather than "
    "for circuits. Operating systems shared one machine among many users, networks joined machines together, "
    "and distributed systems made many machines behave like one. Each layer hid the one below it and made "
    "new work possible on top. Language models are a recent layer: they turn text into numbers, numbers into "
    "probabilities, and probabilities back into text, one token at a time. Serving them well is again a "
    "question of sharing scarce hardware among many users without making anyone wait too long. "
)


def token_prompts(tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of exactly the given token counts, cut from a fixed English text at random offsets."""
    base = tokenizer.encode(_TEXT * 40, add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for n in lengths:
        start = rng.randrange(0, len(base) - n)
        prompts.append(base[start:start + n])
    return prompts
