"""The investigation methodology (the ``investigate`` MCP prompt and the launcher's system
prompt), with a description of the served model injected."""

from __future__ import annotations

from importlib.resources import files
from typing import Any


def methodology_template() -> str:
    return (files("spd_mcp") / "prompts" / "methodology.md").read_text()


def methodology_text(model_info: str) -> str:
    """The methodology with ``model_info`` (markdown) in its model section."""
    return methodology_template().replace("{model_info}", model_info.strip())


def model_info_text(session: Any) -> str:
    """A short markdown description of a run: name, layers with C, planted behaviours."""
    lines = [f"Run **{session.run.name}**; decomposed layers (name: C):"]
    lines += [f"- `{c}`: C={session.cm.Cs[m]}" for m, c in session.to_canonical.items()]
    behaviours = session.behaviours()
    if behaviours:
        lines.append("\nPlanted behaviours (ground truth of the target model):")
        lines += [f"- **{b.name}**: {b.rule} (e.g. `{b.example_prompt}` → "
                  f"`{b.example_expected}`)" for b in behaviours.values()]
    return "\n".join(lines)
