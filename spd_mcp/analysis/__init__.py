"""Analyses on a loaded run (DESIGN §6)."""
