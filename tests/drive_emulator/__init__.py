"""A Google Drive API emulator for tests: the real googleapiclient and pydrive2 talk to it over loopback HTTP.

``server`` holds the protocol, ``state`` the world it keeps, ``query`` the search language subset, ``client`` the
process launcher and the control-API client tests use.
"""

from .client import DriveEmulator, DriveEmulatorClient, ServiceAccount, UserGrant

__all__ = ["DriveEmulator", "DriveEmulatorClient", "ServiceAccount", "UserGrant"]
