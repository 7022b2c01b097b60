"""The application layer: what the MCP tools, the viewer and the CLI share.

- :mod:`.state` — :class:`AppState` (a loaded run, its app database, the compute executor, the
  run's harvest / attributions / dataset index / edit book, looked up once);
- :mod:`.executor` — the compute executor ("GPU lock"); :mod:`.store` — the app database;
- :mod:`.prompts` (validated text and positions), :mod:`.graphs`, :mod:`.interventions`,
  :mod:`.knowledge`, :mod:`.edits`, :mod:`.artifacts`, :mod:`.model_info`, :mod:`.prepare` —
  cached get-or-create operations.

Operations raise domain errors (:class:`spd_mcp.errors.InputError`, :class:`.executor.Busy`);
each face translates them once (the tools into ``ToolError``, the viewer into HTTP 400 / 503).
Nothing here imports ``mcp`` or a face.
"""
