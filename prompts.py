"""Prompts: pure functions from templates, categories and the words' clauses to prompt text.

A clause is what a word adds to a prompt ("in the shape of *s"); `clause_of` reads it from the
word's config. `make_prompts` fills a batch's templates, with union sampling (a random subset of
the words per sample) when training asks for it.
"""
from __future__ import annotations

import random
import re

import torch

from guided_concepts.concepts import CONCEPTS


def render_prompt(template: str, category: str, clauses: dict[str, str]) -> str:
    """Fill a template's slots: {category}; a concept's own slot ({shape}, {pose}, …) gets its
    clause, or nothing when the concept is inactive; {phrases} gets every other active clause.

    'a photo of a {category} {phrases}' -> 'a photo of a chair in the shape of *s with pose *p'
    A clause holding {category} (appearance's "{token} {category}") wraps the noun instead:
    -> 'a photo of a *a chair in the shape of *s'.
    """
    for name, clause in list(clauses.items()):      # "{token} {category}": the word goes on the noun
        if "{category}" in clause:
            category = clause.replace("{category}", category)
            clauses = {**clauses, name: ""}
    slots = {name: "" for name in CONCEPTS}
    slots.update(clauses)
    named = [n for n in CONCEPTS if "{" + n + "}" in template]
    phrases = " ".join(c for n, c in clauses.items() if c and n not in named)
    try:
        text = template.format(category=category, phrases=phrases, **slots)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompt template {template!r}: unknown slot {err}; slots are {{category}}, "
                         f"{{phrases}}, " + ", ".join("{" + n + "}" for n in CONCEPTS)) from err
    text = " ".join(text.split())                        # an empty slot leaves no double space
    text = re.sub(r"\s+([,.;:])", r"\1", text)            # nor a space before punctuation
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)    # nor doubled commas
    return text.strip(" ,;:")


def random_subsets(names: list[str], count: int, rng: random.Random) -> list[list[str]]:
    """Union sampling (Break-A-Scene): a random non-empty subset of `names` per sample, uniform
    over the 2^n - 1 subsets, so every word must also work alone."""
    n = len(names)
    out = []
    for _ in range(count):
        bits = rng.randrange(1, 2 ** n)
        out.append([name for i, name in enumerate(names) if bits >> i & 1])
    return out


def clause_of(config) -> str:
    """A word's clause from its concept config; a {category} in it is left for render_prompt."""
    return config.phrase.format(token=config.token, category="{category}")


def make_prompts(categories: list[str], templates: list[str], clauses: dict[str, str], rng: random.Random,
                 union: bool = False, by_category: dict | None = None, active: list[str] | None = None):
    """-> prompts [B], present {word: bool [B]} (which words each prompt uses).

    clauses: word -> clause, every word of the system (present covers them all).
    union: each sample uses a random non-empty subset of the active words.
    by_category: category -> templates, overriding `templates` for that category.
    """
    active = list(active or clauses)
    subsets = random_subsets(active, len(categories), rng) if union else [active] * len(categories)
    prompts = []
    for category, subset in zip(categories, subsets):
        choices = (by_category or {}).get(category) or templates
        prompts.append(render_prompt(rng.choice(choices), category, {n: clauses[n] for n in subset}))
    present = {n: torch.tensor([n in s for s in subsets]) for n in clauses}
    return prompts, present


def prompts_for(categories: list[str], templates: list[str], clauses: dict[str, str], active: list[str],
                rng: random.Random, by_category: dict | None = None) -> list[str]:
    """The same active words in every sample's prompt."""
    return make_prompts(categories, templates, clauses, rng, by_category=by_category, active=active)[0]
