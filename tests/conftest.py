"""Shared fixtures live in ``tests/fixtures/`` as plugins so that every test folder sees them."""

pytest_plugins = [
    "tests.fixtures.bundles",
    "tests.fixtures.coordinator",
    "tests.fixtures.pki",
    "tests.fixtures.postgres",
]
