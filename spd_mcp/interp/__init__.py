"""Component labels (DESIGN §7): LLM client pool, label store, autointerp, graph-interp, scoring.

Importing the package is light; submodules load torch / the anthropic SDK only when used.
"""
