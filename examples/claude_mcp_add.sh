#!/bin/sh
# Register the spd-mcp server with Claude Code (stdio; the shipped `tales` run).
# Run from the directory whose .venv holds spd-mcp, or put spd-mcp on PATH first.
set -e
claude mcp add spd -- "$(command -v spd-mcp)" serve --run tales
claude mcp list
# Over HTTP instead (start `spd-mcp serve --run tales --http --port 8765 --token "$TOKEN"` first):
#   claude mcp add --transport http spd http://127.0.0.1:8765/mcp --header "Authorization: Bearer $TOKEN"
