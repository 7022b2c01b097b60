"""Helpers for testing the MCP server through real clients (SDK, MCP Inspector, Claude Code)."""
