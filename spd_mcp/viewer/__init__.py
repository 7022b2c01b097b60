"""The local web viewer (``spd-mcp view``): runs, graph explorer, interventions, investigations.

A Starlette app over the same analysis helpers, stores and compute executor as the MCP tools; the
front end is hand-written HTML / JS / SVG shipped in ``static/`` (no build step, no CDN).
"""
