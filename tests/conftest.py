import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_home(tmp_path_factory, monkeypatch):
    """Seed every test and give it a private data directory."""
    torch.manual_seed(0)
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path_factory.mktemp("spd_home")))
    yield


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("SPD_MCP_TEST_THREADS", "2")))
