"""Fixtures shared by every test module."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.cluster",
    "tests.fixtures.ps",
    "tests.fixtures.controller",
    "tests.fixtures.netns",
    "tests.fixtures.run_as",
]


def pytest_collection_modifyitems(items) -> None:
    """Run the longest tests first: ``early`` ones, then those that start whole
    clusters (marked ``slow`` or using the ``cluster`` fixture), then the rest.

    pytest-xdist hands tests out in this order: a long test left for the end
    keeps one worker busy after the others ran out of work, so the long ones go
    first and the short ones fill in behind them (the sort is stable).
    """

    def rank(item) -> int:
        if item.get_closest_marker("early"):
            return 0
        if item.get_closest_marker("slow") or "cluster" in item.fixturenames:
            return 1
        return 2

    items.sort(key=rank)
