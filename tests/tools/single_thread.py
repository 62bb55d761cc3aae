"""Autouse fixture for the tool tests (import it into a test module): one CPU thread, as fast at these tiny sizes and
no spinning against other processes sharing the cores. (Not a conftest.py: that would shadow tests/conftest.py for
``from conftest import rel_err``.)"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
