"""Placeholder words (`*s`, `*p`, …) in the tokenizer(s) and text encoder(s).

The text side is a list of (tokenizer, text encoder) pairs: SD 1.x/2.x have one, SDXL two.
A concept's embedding is the concatenation of its per-encoder parts along the feature axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class TokenError(ValueError):
    """A placeholder or prompt that cannot work; the message names the token and the concept."""


@dataclass(frozen=True)
class PlaceholderSpec:
    concept: str        # "shape"
    token: str          # "*s"
    initializer: str    # a word of the vocabulary, one token long
    num_vectors: int = 1

    @property
    def vector_tokens(self) -> list[str]:
        """`*s`, `*s_1`, … : one tokenizer entry per learned vector."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]


def embedding_dims(text_side) -> list[int]:
    """Each text encoder's embedding width: a word's vector is their parts side by side."""
    return [te.get_input_embeddings().weight.shape[1] for _, te in text_side]


class PlaceholderTable:
    """Token ids and initializer embeddings of every placeholder, for every text encoder."""

    def __init__(self, text_side, specs: list[PlaceholderSpec]):
        self.text_side = list(text_side)
        self.specs = {s.concept: s for s in specs}
        validate_specs(self.text_side, specs)
        self.token_ids: list[dict[str, list[int]]] = []         # per encoder: concept -> ids [K]
        self.initializer_rows: dict[str, torch.Tensor] = {}    # concept -> [D_total]
        for tokenizer, text_encoder in self.text_side:
            added = tokenizer.add_tokens([t for s in specs for t in s.vector_tokens])
            if added != sum(s.num_vectors for s in specs):
                raise TokenError("placeholder tokens were already in the tokenizer; build it from a clean copy")
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = text_encoder.get_input_embeddings().weight
            ids = {}
            with torch.no_grad():
                for s in specs:
                    ids[s.concept] = tokenizer.convert_tokens_to_ids(s.vector_tokens)
                    init_id = tokenizer(s.initializer, add_special_tokens=False).input_ids[0]
                    # Rows start as the initializer word, as in textual inversion, so an exported
                    # token file and the base model agree at step 0.
                    table[ids[s.concept]] = table[init_id].clone()
            self.token_ids.append(ids)
        for s in specs:
            parts = [te.get_input_embeddings().weight[ids[s.concept][0]].detach().float().clone()
                     for (_, te), ids in zip(self.text_side, self.token_ids)]
            self.initializer_rows[s.concept] = torch.cat(parts)

    def word_row(self, word: str) -> torch.Tensor:
        """The input embedding of a one-token vocabulary word, every encoder's part -> [D_total]."""
        parts = []
        for tokenizer, text_encoder in self.text_side:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise TokenError(f"{word!r} is {len(ids)} tokens in this tokenizer; a word row needs one token")
            parts.append(text_encoder.get_input_embeddings().weight[ids[0]].detach().float().clone())
        return torch.cat(parts)

    @property
    def embedding_dims(self) -> list[int]:
        return embedding_dims(self.text_side)

    @property
    def embedding_dim(self) -> int:
        return sum(self.embedding_dims)

    def expand(self, prompt: str) -> str:
        """Rewrite every `*s` as `*s *s_1 …` for multi-vector tokens; reject unknown `*x` words."""
        check_prompt(prompt, self.specs.values())
        for s in self.specs.values():
            if s.num_vectors > 1:
                prompt = re.sub(rf"(?<!\S){re.escape(s.token)}(?![\w])", " ".join(s.vector_tokens), prompt)
        return prompt


def validate_specs(text_side, specs: list[PlaceholderSpec]) -> None:
    seen: dict[str, str] = {}
    for s in specs:
        if not s.token or any(c.isspace() for c in s.token):
            raise TokenError(f"concept '{s.concept}': token {s.token!r} must be one word without spaces")
        if s.num_vectors < 1:
            raise TokenError(f"concept '{s.concept}': num_vectors must be >= 1, got {s.num_vectors}")
        for t in s.vector_tokens:
            if t.lower() in seen:
                raise TokenError(f"concept '{s.concept}': token {t!r} collides with concept '{seen[t.lower()]}'")
            seen[t.lower()] = s.concept
        for tokenizer, _ in text_side:
            vocab = tokenizer.get_vocab()
            for t in s.vector_tokens:
                if t in vocab or t.lower() in vocab or f"{t.lower()}</w>" in vocab:
                    raise TokenError(f"concept '{s.concept}': token {t!r} is already a word of the vocabulary; "
                                     "pick a string the tokenizer does not know, e.g. '*s'")
            ids = tokenizer(s.initializer, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise TokenError(f"concept '{s.concept}': initializer word {s.initializer!r} is {len(ids)} tokens, "
                                 "it must be exactly one token of the vocabulary")


_PLACEHOLDER_LIKE = re.compile(r"(?<![\w*])\*[A-Za-z]\w*")


def check_prompt(prompt: str, specs) -> None:
    known = {t.lower() for s in specs for t in s.vector_tokens}
    for word in _PLACEHOLDER_LIKE.findall(prompt):
        if word.lower() not in known:
            names = ", ".join(sorted(s.token for s in specs)) or "none"
            raise TokenError(f"prompt {prompt!r} uses {word!r}, which this run did not train (trained: {names})")
