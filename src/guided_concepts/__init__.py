"""guided-concepts: several guided words at once (shape *s, pose *p, appearance *a, style *t) for a
frozen Stable Diffusion model.

The repository root is this package (pyproject's `package-dir`), so its folders and scripts sit at
the root and import each other as `guided_concepts.<module>`; installing adds this one name.
Importing it loads nothing heavy.
"""
__version__ = "0.1.0"
