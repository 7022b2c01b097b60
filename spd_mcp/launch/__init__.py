"""Launchers (DESIGN §9): run an investigation (server + Claude Code) locally or under SLURM."""
