"""guided-concepts: several guided words at once (shape *s, pose *p, appearance *a, style *t) for a
frozen Stable Diffusion model.

This folder is the installed package: its entries are links to the library's folders and modules
at the repository root (docs/usage.md#layout), which import each other as
`guided_concepts.<module>`; installing adds this one name. Importing it loads nothing heavy.
"""
__version__ = "0.1.0"
