"""The real OpenID Connect provider of the login tests (tests/e2e/auth/conftest.py), for the authenticator's tests."""

from tests.e2e.auth.conftest import oidc  # noqa: F401 - a fixture
