"""Fixtures shared by every test module."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.cluster",
    "tests.fixtures.ps",
    "tests.fixtures.controller",
    "tests.fixtures.netns",
]


def pytest_collection_modifyitems(items) -> None:
    """Tests marked ``early`` run first (a stable sort keeps the rest in order).

    pytest-xdist hands tests out in this order: a long test taken last would
    keep one worker busy after the others ran out of work.
    """
    items.sort(key=lambda item: item.get_closest_marker("early") is None)
