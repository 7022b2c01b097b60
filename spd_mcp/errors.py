"""The exception tree: every error spd-mcp raises on purpose descends from :class:`SpdMcpError`.

    SpdMcpError
    ├── InputError (also a ValueError)   bad input: the message names it and says what is valid
    │   ├── BadKeyError                  keys.py: malformed or out-of-range key
    │   ├── AnalysisError                an analysis refused its arguments
    │   ├── RunError, ConfigError, TargetError, PatternError, UnknownZooTarget   run / config
    │   ├── HarvestError, AttributionError, GraphInterpError                      derived stages
    │   └── BadRequest                   the viewer refused a request
    ├── Busy                             the compute queue is full (retry later)
    └── OperationError (also a RuntimeError)   something outside the caller's input failed
        └── LaunchError, SlurmError, DemoError, HarvestInterrupted, ...

Faces translate by category, in one place each: the MCP tools turn ``InputError`` and ``Busy``
into an ``isError`` result the model reads; the viewer into HTTP 400 / 503; the CLI into exit 2.
"""

from __future__ import annotations


class SpdMcpError(Exception):
    """Root of every error spd-mcp raises on purpose."""


class InputError(SpdMcpError, ValueError):
    """Bad input; the message says what is wrong and what is valid."""


class AnalysisError(InputError):
    """Bad input to an analysis (unknown word, empty text, incompatible arguments)."""


class OperationError(SpdMcpError, RuntimeError):
    """An operation failed for a reason other than its input (a process, a cluster, a budget)."""
