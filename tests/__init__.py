"""The iat-jax test suite (a package: fixtures are `from tests import ...`)."""
