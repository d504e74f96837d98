"""Fixtures shared by every test module."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.cluster",
    "tests.fixtures.ps",
    "tests.fixtures.controller",
]
