from guided_concepts.tokens.placeholders import PlaceholderSpec, PlaceholderTable, TokenError, check_prompt
from guided_concepts.tokens.text import encode_prompts, encode_prompts_with_pooled, placeholder_selection, tokenize

__all__ = ["PlaceholderSpec", "PlaceholderTable", "TokenError", "check_prompt", "encode_prompts",
           "encode_prompts_with_pooled", "placeholder_selection", "tokenize"]
