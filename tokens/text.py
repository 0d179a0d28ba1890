"""Encode prompts with per-sample embeddings written at every placeholder position."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from guided_concepts.tokens.placeholders import PlaceholderTable, TokenError


def tokenize(table: PlaceholderTable, prompts: list[str]) -> list[torch.Tensor]:
    """Prompts -> token ids [B, L] per text encoder (padded to the tokenizer's max length).

    A prompt so long that truncation would cut a placeholder off is an error, not a silent
    prompt without its word.
    """
    prompts = [table.expand(p) for p in prompts]
    out = []
    for (tok, _), ids_by_concept in zip(table.text_side, table.token_ids):
        placeholder_ids = {i for ids in ids_by_concept.values() for i in ids}
        for prompt, full in zip(prompts, tok(prompts, add_special_tokens=True).input_ids):
            cut = [i for i in full[tok.model_max_length - 1:] if i in placeholder_ids]
            if cut:
                raise TokenError(f"prompt {prompt!r} is {len(full)} tokens; its placeholder falls past the text "
                                 f"encoder's {tok.model_max_length}-token limit, shorten the prompt")
        out.append(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids)
    return out


@contextmanager
def write_embeddings(embedding_layer: torch.nn.Embedding, input_ids: torch.Tensor,
                     ids_by_concept: dict[str, list[int]], embeds: dict[str, torch.Tensor]):
    """Within the block, the token embedding layer returns `embeds[c][b, k]` wherever sample b
    has the k-th vector token of concept c (any position, any number of occurrences).

    embeds[c]: [B, K_c, D] for this encoder's slice of the feature axis.
    A forward hook keeps the text encoder's own forward untouched, for any encoder class.
    """
    def hook(module, args, output):                           # output: [B, L, D]
        if args[0].shape != input_ids.shape:
            return output
        out = output
        for concept, vectors in embeds.items():
            for k, token_id in enumerate(ids_by_concept[concept]):
                where = (input_ids == token_id).unsqueeze(-1)  # [B, L, 1]
                value = vectors[:, k, None, :].to(out.dtype)   # [B, 1, D]
                out = torch.where(where.to(out.device), value, out)
        return out

    handle = embedding_layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_prompts(table: PlaceholderTable, input_ids: list[torch.Tensor],
                   embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text embeddings [B, L, sum(D_i)] with the concepts' embeddings [B, K, sum(D_i)] written in.

    Concepts missing from `embeds` keep their placeholder rows (the initializer word).
    """
    return encode_prompts_with_pooled(table, input_ids, embeds, layer=-1)[0]     # SD's pooled (an index) unused


def encode_prompts_with_pooled(table: PlaceholderTable, input_ids: list[torch.Tensor],
                               embeds: dict[str, torch.Tensor], layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (text embeddings [B, L, sum(D_i)], pooled [B, P]) with the concepts' embeddings written in.

    layer -1 is each encoder's last hidden state (SD 1.x/2.x); SDXL reads the penultimate layer
    (-2, before the final layer norm) of both encoders, as diffusers' SDXL pipeline does. The
    pooled embedding is the last encoder's first output (SDXL: text_encoder_2's projection at the
    end token), so the learned words reach it through the prompt it pools.
    """
    outputs, start = [], 0
    for (tokenizer, text_encoder), ids, dim, ids_by_concept in zip(
            table.text_side, input_ids, table.embedding_dims, table.token_ids):
        ids = ids.to(text_encoder.device)
        sliced = {c: e[..., start:start + dim] for c, e in embeds.items()}
        with write_embeddings(text_encoder.get_input_embeddings(), ids, ids_by_concept, sliced):
            out = text_encoder(ids, output_hidden_states=layer != -1)
        outputs.append(out[0] if layer == -1 else out.hidden_states[layer])    # [B, L, D_i]
        start += dim
    # The pooled embedding comes from the last encoder only (SDXL's text_encoder_2).
    return torch.cat(outputs, dim=-1), end_token_pooled(tokenizer, text_encoder, ids, out)   # [B, P]


def end_token_pooled(tokenizer, text_encoder, ids: torch.Tensor, out) -> torch.Tensor | None:
    """The encoder's pooled output read at each prompt's end token (then projected, for an encoder
    with a projection: SDXL's text_encoder_2). transformers pools at `input_ids.argmax()` for
    configs with eos_token_id 2 (SDXL's text_encoder_2 has that), which lands on an added word
    (ids above the end token) and ignores the rest of the prompt; A1111 and ComfyUI pool at the end
    token, as SDXL was trained. (diffusers' pipeline with loaded words inherits transformers' rule.)"""
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        return None
    end = (ids == tokenizer.eos_token_id).int().argmax(dim=-1)                      # first end token [B]
    pooled = hidden[torch.arange(len(ids), device=hidden.device), end]              # [B, D]
    projection = getattr(text_encoder, "text_projection", None)
    return projection(pooled) if projection is not None else pooled


def placeholder_selection(table: PlaceholderTable, input_ids: torch.Tensor, concepts: list[str]) -> torch.Tensor:
    """[B, L, C] 0/1: which prompt positions hold concept c's vectors (first text encoder's ids).

    The attention store multiplies attention probabilities [B, N, L] by this to get each
    concept's map [B, N, C], summed over its vectors and occurrences.
    """
    ids_by_concept = table.token_ids[0]
    columns = [torch.isin(input_ids, torch.tensor(ids_by_concept[c])) for c in concepts]
    if not columns:                                        # no word reads attention
        return input_ids.new_zeros(input_ids.shape + (0,), dtype=torch.float)
    return torch.stack(columns, dim=-1).float()
