"""DO-LAB's custom scopes (dolab_services.scopes), the shared handler base's bounds (dolab_services.web), and how the
shipped config wires both: unit tests, no hub."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from jupyterhub import scopes as hub_scopes
from traitlets.config import Config

from dolab_services.scopes import (
    ADMIN_ROLE,
    CUSTOM_SCOPES,
    EXTEND_SERVERS,
    MANAGE_BACKUPS,
    READ_USAGE,
    STOP_SERVERS,
    with_admin_role,
    with_custom_scopes,
)
from dolab_services.web import bounded_number, name_arg, shown

DOLAB = [STOP_SERVERS, EXTEND_SERVERS, READ_USAGE, MANAGE_BACKUPS]


def test_the_hub_accepts_the_definitions() -> None:
    # The hub's own check (names, descriptions); defining them again with the same text is allowed.
    hub_scopes.define_custom_scopes(CUSTOM_SCOPES)
    hub_scopes._check_scopes_exist([*DOLAB, f"{STOP_SERVERS}!user=bob", f"{STOP_SERVERS}!server=bob/"])
    assert all(CUSTOM_SCOPES[s]["description"].endswith(".") for s in DOLAB)


def test_custom_scopes_keep_the_admins_own() -> None:
    c = Config()
    c.JupyterHub.custom_scopes = {"custom:site:read": {"description": "Theirs."}}
    assert with_custom_scopes(c) == {**CUSTOM_SCOPES, "custom:site:read": {"description": "Theirs."}}
    assert with_custom_scopes(Config()) == CUSTOM_SCOPES


def test_the_admin_role_goes_to_admin_users_and_admin_groups() -> None:
    c = Config()
    c.Authenticator.admin_users = {"ann", "admin"}
    c.GenericOAuthenticator.admin_groups = {"ops"}
    c.JupyterHub.load_roles = [{"name": "dolab-cli", "scopes": ["list:users"], "services": ["dolab-cli"]}]
    roles = with_admin_role(c)
    assert roles[0] == {"name": "dolab-cli", "scopes": ["list:users"], "services": ["dolab-cli"]}
    assert roles[1] == {
        "name": ADMIN_ROLE,
        "description": roles[1]["description"],
        "scopes": DOLAB,
        "users": ["admin", "ann"],
        "groups": ["ops"],
    }


def test_an_overlays_admin_role_is_extended_not_duplicated() -> None:
    c = Config()
    c.Authenticator.admin_users = {"ann"}
    c.JupyterHub.load_roles = [{"name": ADMIN_ROLE, "scopes": [READ_USAGE], "users": ["bob"]}]
    (role,) = with_admin_role(c)
    assert role == {
        "name": ADMIN_ROLE,
        "scopes": [READ_USAGE, STOP_SERVERS, EXTEND_SERVERS, MANAGE_BACKUPS],
        "users": ["ann", "bob"],
    }


def test_no_one_is_named_when_the_authenticator_manages_roles() -> None:
    # The hub refuses load_roles that assign users or groups then: the authenticator's roles must grant the scopes.
    c = Config()
    c.Authenticator.admin_users = {"ann"}
    c.Authenticator.manage_roles = True
    (role,) = with_admin_role(c)
    assert "users" not in role and "groups" not in role and role["scopes"] == DOLAB


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param(1, True, id="int"),
        pytest.param(0.5, True, id="float"),
        pytest.param(100, True, id="the maximum"),
        pytest.param(0, False, id="the minimum, excluded"),
        pytest.param(100.0001, False, id="over"),
        pytest.param(10**400, False, id="400 digits"),
        pytest.param(-(10**400), False, id="minus 400 digits"),
        pytest.param(math.nan, False, id="NaN"),
        pytest.param(math.inf, False, id="inf"),
        pytest.param(True, False, id="bool"),
        pytest.param("1", False, id="text"),
        pytest.param([1], False, id="list"),
        pytest.param(None, False, id="none"),
    ],
)
def test_bounded_number(value: Any, ok: bool) -> None:
    if ok:
        assert bounded_number(value, "hours", minimum=0, maximum=100, above_minimum=True) == float(value)
    else:
        with pytest.raises(ValueError, match=r"^hours must be a number above 0 to 100, not .{1,48}\.$"):
            bounded_number(value, "hours", minimum=0, maximum=100, above_minimum=True)


def test_shown_quotes_a_short_piece() -> None:
    assert shown("bob") == "'bob'"
    assert shown("x" * 10_000) == "'" + "x" * 39 + "..."
    assert shown(10**400).endswith("...") and len(shown(10**400)) == 43
    big = json.loads("9" * 4000)  # under Python's limit for reading, over nothing for repr
    assert len(shown(big)) == 43
    assert shown(10**5000) == "a number too long to show"  # past Python's digit limit for str()


def test_name_arg() -> None:
    assert name_arg("bob", "user") == "bob"
    for bad in ("x" * 256, 1, None, ["bob"]):
        with pytest.raises(ValueError, match="user must be a name of at most 255 characters"):
            name_arg(bad, "user")
