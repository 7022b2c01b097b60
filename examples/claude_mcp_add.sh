#!/bin/sh
# Register the spd-mcp server with Claude Code (stdio; the shipped `tales` run) and check that
# Claude Code connects to it. Self-checking: exits non-zero unless `claude mcp list` shows the
# server connected. Run from the directory whose .venv holds spd-mcp, or put spd-mcp on PATH.
set -e
claude mcp add spd -- "$(command -v spd-mcp)" serve --run tales
listed=$(claude mcp list)
echo "$listed"
echo "$listed" | grep -q "^spd: .* - ✔ Connected" || { echo "spd is not connected" >&2; exit 1; }
# Over HTTP instead (start `spd-mcp serve --run tales --http --port 8765 --token "$TOKEN"` first):
#   claude mcp add --transport http spd http://127.0.0.1:8765/mcp --header "Authorization: Bearer $TOKEN"
