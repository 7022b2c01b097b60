"""Decompositions made with Goodfire's public ``spd`` repository, imported as spd-mcp runs: their
config and checkpoint format (``fmt``), their target architectures rebuilt here (``models``), and
the importer (``importer``)."""
