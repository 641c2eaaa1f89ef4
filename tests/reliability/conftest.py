"""Reliability tests: marked ``reliability`` so a quick run can skip them (``-m "not reliability"``)."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/reliability/" in str(item.fspath):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.slow)


def report(title: str, **figures) -> None:
    """Print figures so that they show in the test log (run with ``-s`` or see the captured output)."""
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))
