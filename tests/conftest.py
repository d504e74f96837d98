"""Fixtures shared by every test module."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.cluster",
    "tests.fixtures.ps",
    "tests.fixtures.controller",
]


def pytest_collection_modifyitems(items) -> None:
    """Run the tests that start whole clusters first.

    pytest-xdist hands tests out in this order: a long test left for the end
    keeps one worker busy after the others ran out of work, so the long ones
    (marked ``slow`` or using the ``cluster`` fixture) go first and the short
    ones fill in behind them.
    """
    items.sort(
        key=lambda item: not (item.get_closest_marker("slow") or "cluster" in item.fixturenames)
    )
