"""Where the browser tests are required (``make test`` as root installs chromium), a missing browser
is a failure rather than a silent skip of the viewer's browser tests."""

from __future__ import annotations

import os

import pytest

from tests.viewer_browser import missing_reason


@pytest.mark.skipif(os.environ.get("SPD_MCP_REQUIRE_BROWSER") != "1",
                    reason="SPD_MCP_REQUIRE_BROWSER=1 not set (make test sets it as root)")
def test_browser_is_available_when_required() -> None:
    assert missing_reason() is None, missing_reason()
