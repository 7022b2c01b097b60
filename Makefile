# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; installing it first keeps pip from pulling a
# multi-GB CUDA build. GPU users can install any torch >= 2.3 before `pip install -e .`.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo demo-hf demo-tms venv lint clean bench node-tools browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" numpy
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Real MCP clients for the tests (Claude Code CLI, MCP Inspector), pinned, into .cache/node.
node-tools: venv
	$(PY) -m tests.realclients.node_tools

# Debian's chromium for the viewer's browser tests (Playwright drives it; nothing is downloaded).
# Installed quietly when missing and we are root; otherwise those tests skip, saying why.
browser:
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the viewer's browser tests will skip"

test: venv node-tools browser
	$(VENV)/bin/ruff check .
	SPD_MCP_REQUIRE_BROWSER=$$([ "$$(id -u)" = 0 ] && echo 1) $(PY) -m pytest -q

# A scripted (LLM-free) investigation of the shipped `tales` run through the MCP server.
demo: venv
	SPD_MCP_HOME=$${SPD_MCP_HOME:-$(CURDIR)/out/home} $(VENV)/bin/spd-mcp demo

# The same investigation of the shipped `tales-llama` run (a Hugging Face Llama on tales).
demo-hf: venv
	SPD_MCP_HOME=$${SPD_MCP_HOME:-$(CURDIR)/out/home} $(VENV)/bin/spd-mcp demo --run tales-llama

# Decompose the tms-5-2 toy and evaluate it against its ground truth.
demo-tms: venv
	SPD_MCP_HOME=$${SPD_MCP_HOME:-$(CURDIR)/out/home} $(VENV)/bin/spd-mcp zoo build tms-5-2 --device cpu --overwrite
	SPD_MCP_HOME=$${SPD_MCP_HOME:-$(CURDIR)/out/home} $(VENV)/bin/spd-mcp evaluate tms-5-2

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) benchmarks/decompose.py

clean:
	rm -rf $(VENV) out
