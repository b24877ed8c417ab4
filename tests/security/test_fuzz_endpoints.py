"""Attack: hostile JSON at every endpoint a user can reach, looking for a 500 (and a traceback to read).

A real hub (tests/security/servicehub.py) runs the culler, the monitor and dolab-sync; hypothesis posts random JSON
(nested lists and objects, huge integers, long strings, NaN and Infinity, deep nesting, bodies that are not JSON)
to each service's JSON API and random text to its query arguments, as Mallory (a user with a running server) and
as an admin holding every DO-LAB scope (whose requests reach the hub with the names they carry), and random
``user_options`` to the hub's spawn API. Every answer must be below 500 and carry no traceback; the reported cases
(``{"gpus": "1" * 5000}``, ``{"run_hours": 10**400}``, the culler's ``{"hours": 10**400}``) are 400s with a
sentence and change nothing.

The fuzz user's spawns never start a server: the hub's quota check (``DoLabSpawner.quota_check``, which runs after
the options are validated) refuses that one user, so valid options cost a refusal, not a server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..e2e.hub import GPU_INVENTORY, Hub
from ..sync import conftest as sync_conftest
from ..sync.conftest import S3Server
from .servicehub import CULLER, MONITOR, SYNC, call, service_url, start_hub, token, wait_services

pytestmark = pytest.mark.e2e

s3_server = sync_conftest.s3_server  # the session's moto_server (a fixture of tests/sync)

MALLORY, ADMIN, FUZZ = "mallory", "admin", "fuzz"
#: 30 random bodies per endpoint and user (about 60 per endpoint): the reported inputs have tests of their own, and
#: the whole file stays near two minutes of ``make test`` on two cores.
FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

OVERLAY = f"""
from jupyterhub.spawner import SpawnException

c.DoLabSpawner.profile_list = [
    {{"display_name": "CPU only", "slug": "cpu", "default": True}},
    {{
        "display_name": "Two A100",
        "slug": "a100x2",
        "gpus": 2,
        "gpu_type": "A100",
        "profile_options": {{
            "env": {{
                "display_name": "Python environment",
                "choices": {{
                    "system": {{"display_name": "System", "default": True}},
                    "torch": {{"display_name": "Torch"}},
                }},
            }}
        }},
    }},
]
c.DoLabSpawner.gpu_inventory = {GPU_INVENTORY!r}
c.DoLabSpawner.max_run_hours = 24


def refuse_the_fuzz_user(spawner, selection):
    # Runs after the options were validated: the fuzz user's valid options never start a server.
    if spawner.user.name == {FUZZ!r}:
        raise SpawnException("The fuzz user never starts a server.", reason="quota", status_code=403)


c.DoLabSpawner.quota_check = refuse_the_fuzz_user
"""

# ----- what an attacker sends --------------------------------------------------------------------------------

#: Values that broke or could break a validator: huge and edge numbers, long and odd text, names of real users.
SPECIAL = st.sampled_from(
    [
        10**400,
        -(10**400),
        2**63,
        2**53 + 1,
        1e308,
        -1e308,
        5e-324,
        -0.0,
        "1" * 5000,
        "x" * 70_000,
        "",
        " ",
        "NaN",
        "inf",
        "-Infinity",
        "1e999",
        "../../etc",
        "/etc/passwd",
        "a\x00b",
        "\ud800",
        "é" * 300,
        MALLORY,
        ADMIN,
        "2030-01-01T00:00:00Z",
        "99999-12-31T00:00:00Z",
    ]
)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**450), max_value=10**450)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | SPECIAL
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
#: Bodies that are not what json.dumps writes: NaN and friends, numbers past float or int limits, deep nesting.
RAW_BODIES = [
    '{"hours": NaN, "server": ""}',
    '{"hours": Infinity}',
    '{"hours": -Infinity, "user": "admin"}',
    '{"hours": 1e999}',
    '{"hours": ' + "9" * 5000 + "}",
    "[" * 50_000 + "]" * 50_000,
    '{"a":' * 20_000 + "1" + "}" * 20_000,
    "not json at all",
    "\udcff\udcfe\x00",  # bytes that are not UTF-8 (written with surrogateescape)
    "",
    "{}",
    "[]",
    '"a string"',
    "1" * 5000,
]


def bodies(keys: list[str]) -> st.SearchStrategy[str]:
    """Request bodies: objects with the endpoint's own keys (and others) holding any JSON, any JSON at all, and the
    raw bodies above."""
    objects = st.dictionaries(st.sampled_from(keys) | st.text(max_size=12), JSON_VALUES, max_size=6)
    return st.one_of(objects.map(json.dumps), JSON_VALUES.map(json.dumps), st.sampled_from(RAW_BODIES))


#: Query and form text: URLs stay under tornado's 64 KiB header limit (past it the server drops the connection,
#: as it should; the bodies carry the long strings).
TEXT = st.text(max_size=60) | SPECIAL.filter(lambda v: isinstance(v, str) and len(v) < 10_000) | st.integers().map(str)


# ----- the hub -----------------------------------------------------------------------------------------------


@dataclass
class Lab:
    hub: Hub
    tokens: dict[str, str]

    def stop_time(self, user: str) -> str:
        """The user's stop time as their culler page shows it."""
        page = call(self.hub, CULLER, "GET", "", self.tokens[user])
        assert page.status_code == 200, page.text
        return page.text[page.text.index("<time") :][:80]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Lab]:
    hub = start_hub(tmp_path_factory.mktemp("fuzz"), s3_server, overlay=OVERLAY)
    try:
        for user in (MALLORY, ADMIN, FUZZ):
            hub.create_user(user)
        reply = hub.start_server(MALLORY, {"profile": "cpu", "run_hours": 2})
        assert reply.status_code in (201, 202), reply.text
        hub.wait_ready(MALLORY, timeout=180)
        wait_services(hub)
        tokens = {user: token(hub, user) for user in (MALLORY, ADMIN, FUZZ)}
        yield Lab(hub, tokens)
    finally:
        hub.shutdown()


def assert_no_failure(reply: requests.Response, what: Any) -> None:
    """No 5xx, no traceback: a refusal is a sentence."""
    assert reply.status_code < 500, (reply.status_code, reply.text[:600], str(what)[:300])
    assert "Traceback" not in reply.text, (reply.text[:600], str(what)[:300])


# ----- the services' JSON APIs ---------------------------------------------------------------------------------

#: (service, method, path, the keys it reads)
JSON_ENDPOINTS = [
    (CULLER, "POST", "api/extend", ["user", "server", "hours"]),
    (CULLER, "POST", "api/keepalive", ["user", "server"]),
    (CULLER, "POST", "api/stop", ["user", "server"]),
    (SYNC, "POST", "api/backup", ["user", "server"]),
    (SYNC, "POST", "api/restore", ["user", "snapshot", "paths", "into"]),
    (SYNC, "PUT", "api/target", ["user", "target"]),
]


@pytest.mark.parametrize("who", [MALLORY, ADMIN])
@pytest.mark.parametrize(
    ("service", "method", "path", "keys"), JSON_ENDPOINTS, ids=[f"{e[0]}-{e[2]}" for e in JSON_ENDPOINTS]
)
def test_random_json_bodies_get_no_5xx(
    lab: Lab, who: str, service: str, method: str, path: str, keys: list[str]
) -> None:
    @FUZZ_SETTINGS
    @given(body=bodies(keys))
    def post(body: str) -> None:
        if who == ADMIN and path == "api/stop" and MALLORY in body:
            return  # the admin may stop Mallory's server: that is a right, not a failure to look for
        reply = call(lab.hub, service, method, path, lab.tokens[who], data=body.encode("utf-8", "surrogateescape"))
        assert_no_failure(reply, body)

    post()


# ----- query arguments and path parts ----------------------------------------------------------------------------

#: (service, how a random text becomes a request path)
QUERY_ENDPOINTS: list[tuple[str, Callable[[str], str]]] = [
    (MONITOR, lambda text: f"api/usage?user={quote(text, safe='')}"),
    (MONITOR, lambda text: f"api/quota/{quote(text, safe='') or 'x'}"),
    (MONITOR, lambda text: f"?user={quote(text, safe='')}"),
    (MONITOR, lambda text: f"api/overview?{quote(text, safe='=&')}"),
    (SYNC, lambda text: f"api/backups?user={quote(text, safe='')}"),
    (SYNC, lambda text: f"api/target?user={quote(text, safe='')}"),
    (SYNC, lambda text: f"api/backups/{''.join(c for c in text if c.isascii() and c.isalnum()) or '1' * 500}"),
    (CULLER, lambda text: f"api/warnings?{quote(text, safe='=&')}"),
    (CULLER, lambda text: f"lab-session?{quote(text, safe='=&')}"),
]
QUERY_IDS = [
    "monitor-usage",
    "monitor-quota",
    "monitor-page",
    "monitor-overview",
    "sync-backups",
    "sync-target",
    "sync-snapshot",
    "culler-warnings",
    "culler-lab-session",
]


@pytest.mark.parametrize("who", [MALLORY, ADMIN])
@pytest.mark.parametrize(("service", "make_path"), QUERY_ENDPOINTS, ids=QUERY_IDS)
def test_random_query_arguments_get_no_5xx(lab: Lab, who: str, service: str, make_path: Callable[[str], str]) -> None:
    @FUZZ_SETTINGS
    @given(text=TEXT)
    def get(text: str) -> None:
        path = make_path(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
        reply = requests.get(
            service_url(lab.hub, service) + path, headers={"Authorization": f"token {lab.tokens[who]}"}, timeout=120
        )
        assert_no_failure(reply, path)

    get()


def test_random_culler_page_forms_get_no_5xx(lab: Lab) -> None:
    @FUZZ_SETTINGS
    @given(action=st.sampled_from(["extend", "keepalive"]) | TEXT, server=TEXT, hours=TEXT)
    def post(action: str, server: str, hours: str) -> None:
        fields = {"action": action, "server": server, "hours": hours}
        fields = {k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k, v in fields.items()}
        reply = call(lab.hub, CULLER, "POST", "", lab.tokens[MALLORY], data=fields)
        assert_no_failure(reply, fields)

    post()


# ----- the hub's spawn API ----------------------------------------------------------------------------------------

SPAWN_KEYS = ["profile", "gpus", "run_hours", "stop_at", "gpu_type", "max_price_per_hour", "env"]


def spawn(lab: Lab, body: str) -> requests.Response:
    """POST the fuzz user's default server with ``body`` (``{"user_options": ...}``), as the fuzz user."""
    return requests.post(
        f"{lab.hub.url}/hub/api/users/{FUZZ}/server",
        data=body.encode("utf-8", "surrogatepass"),
        headers={"Authorization": f"token {lab.tokens[FUZZ]}"},
        timeout=120,
    )


def test_random_user_options_get_no_5xx(lab: Lab) -> None:
    options = st.dictionaries(st.sampled_from(SPAWN_KEYS) | st.text(max_size=12), JSON_VALUES, max_size=6)

    @FUZZ_SETTINGS
    @given(user_options=options | JSON_VALUES)
    def post(user_options: Any) -> None:
        body = json.dumps({"user_options": user_options})
        reply = spawn(lab, body)
        assert_no_failure(reply, body)
        assert reply.status_code not in (201, 202), "the fuzz user's server never starts"

    post()


# ----- the reported cases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_options", "sentence"),
    [
        pytest.param({"profile": "a100x2", "gpus": "1" * 5000}, "gpus must be a whole number", id="gpus-5000-digits"),
        pytest.param({"run_hours": 10**400}, "run_hours must be a number of hours", id="run_hours-10**400"),
        pytest.param({"max_price_per_hour": 10**400}, "Unknown option", id="price-on-a-local-profile"),
        pytest.param({"stop_at": "2" * 5000}, "is not an ISO 8601 time", id="stop_at-5000-chars"),
    ],
)
def test_the_reported_user_options_are_400s(lab: Lab, user_options: dict[str, Any], sentence: str) -> None:
    reply = spawn(lab, json.dumps({"user_options": user_options}))
    assert reply.status_code == 400, reply.text[:600]
    message = reply.json()["message"]
    assert sentence in message and len(message) < 500 and "Traceback" not in message, message
    assert "" not in lab.hub.user(FUZZ).get("servers", {}), "no server, not even a pending one"


def test_the_reported_extension_is_a_400_and_changes_nothing(lab: Lab) -> None:
    before = lab.stop_time(MALLORY)
    for hours in (10**400, -(10**400), 1e308):
        body = json.dumps({"server": "", "hours": hours})
        reply = call(lab.hub, CULLER, "POST", "api/extend", lab.tokens[MALLORY], data=body)
        assert reply.status_code == 400, reply.text[:600]
        message = reply.json()["message"]
        assert message.startswith("hours must be a number above 0 to") and len(message) < 200, message
    assert lab.stop_time(MALLORY) == before, "the stop time did not move"
