"""DoLabAuthenticator: log in with the team's identity provider; groups become plans; tokens stay in the hub.

``c.JupyterHub.authenticator_class = "dolab"`` (any OpenID Connect provider), ``"dolab-google"`` or
``"dolab-github"``; the shipped ``jupyterhub_config.py`` switches with ``DOLAB_AUTH`` (see :mod:`.envconfig`).
"""

from .base import DoLabLoginHandler, DoLabOAuthenticator
from .errors import ProviderError
from .providers import DRIVE_SCOPE, DoLabAuthenticator, DoLabGitHubAuthenticator, DoLabGoogleAuthenticator

__all__ = [
    "DRIVE_SCOPE",
    "DoLabAuthenticator",
    "DoLabGitHubAuthenticator",
    "DoLabGoogleAuthenticator",
    "DoLabLoginHandler",
    "DoLabOAuthenticator",
    "ProviderError",
]
