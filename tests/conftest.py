import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer checks; CI runs them, `-m 'not slow'` skips them locally")
