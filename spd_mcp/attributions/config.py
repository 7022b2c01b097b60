"""Attribution-stage configuration and its hash (light: no torch)."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.errors import InputError

ATTRIBUTIONS_FORMAT = 1
DEFAULT_TOKENS = 30_000


class AttributionError(InputError):
    """Attributions cannot be computed, found or queried; the message says why."""


class AttributionConfig(BaseModel):
    """What an attribution stage computes: docs 0, 1, 2, … of the run's dataset until
    ``n_tokens`` tokens are read (whole documents, BOS included, truncated to the context)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_tokens: int = Field(DEFAULT_TOKENS, gt=0, description="tokens to read (whole documents)")
    batch_size: int = Field(16, gt=0, description="documents per batch")


def config_hash(run_id: str, config: AttributionConfig) -> str:
    """Short sha256 of the canonical JSON of (format, run id, config)."""
    payload = {"format": ATTRIBUTIONS_FORMAT, "run_id": run_id,
               "config": config.model_dump(mode="json")}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
