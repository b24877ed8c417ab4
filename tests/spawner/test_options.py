"""Unit tests for dolab_spawner.options: a user's options (resolve_options, Selection, parse_stop_at) against the
profiles of tests/spawner/test_profiles.py."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dolab_core.times import format_time
from dolab_spawner.backends.runpod_offers import pod_request
from dolab_spawner.options import OptionsError, Selection, parse_stop_at, resolve_options
from dolab_spawner.profiles import parse_profile_list
from tests.spawner.test_profiles import A100, BACKENDS, H100, MAX_RUN_HOURS, NOW, PROFILE_LIST, PROFILES, UTC, profile

# ----- resolve_options: good options ------------------------------------------------------------------------

GOOD_OPTIONS = [
    pytest.param({}, ("cpu", {}, 0, None, None), id="empty selects the default profile"),
    pytest.param(None, ("cpu", {}, 0, None, None), id="None selects the default profile"),
    pytest.param({"profile": ""}, ("cpu", {}, 0, None, None), id="empty profile selects the default"),
    pytest.param({"profile": "cpu"}, ("cpu", {}, 0, None, None), id="explicit profile"),
    pytest.param({"profile": "a100x2"}, ("a100x2", {"env": "torch"}, 2, None, None), id="default choice and all gpus"),
    pytest.param(
        {"profile": "a100x2", "env": "system"}, ("a100x2", {"env": "system"}, 2, None, None), id="option choice"
    ),
    pytest.param(
        {"profile": "a100x2", "env": ""}, ("a100x2", {"env": "torch"}, 2, None, None), id="empty choice is default"
    ),
    pytest.param({"profile": "a100x2", "gpus": 1}, ("a100x2", {"env": "torch"}, 1, None, None), id="gpus in range"),
    pytest.param(
        {"profile": "a100x2", "gpus": "1"}, ("a100x2", {"env": "torch"}, 1, None, None), id="gpus from the form"
    ),
    pytest.param(
        {"profile": "a100x2", "gpus": " 2 "}, ("a100x2", {"env": "torch"}, 2, None, None), id="gpus with spaces"
    ),
    pytest.param({"profile": "gpu1", "gpus": 1}, ("gpu1", {}, 1, None, None), id="one-GPU profile"),
    pytest.param({"profile": "cpu", "gpus": 0}, ("cpu", {}, 0, None, None), id="gpus 0 on a CPU profile"),
    pytest.param(
        {"run_hours": 3}, ("cpu", {}, 0, NOW + timedelta(hours=3), 3.0), id="run_hours sets stop_at = now + hours"
    ),
    pytest.param({"run_hours": "1.5"}, ("cpu", {}, 0, NOW + timedelta(hours=1.5), 1.5), id="run_hours from the form"),
    pytest.param({"run_hours": 24}, ("cpu", {}, 0, NOW + timedelta(hours=24), 24.0), id="run_hours at the max"),
    pytest.param({"run_hours": ""}, ("cpu", {}, 0, None, None), id="empty run_hours is none"),
    pytest.param(
        {"stop_at": "2030-01-01T18:00:00Z"},
        ("cpu", {}, 0, datetime(2030, 1, 1, 18, tzinfo=UTC), None),
        id="stop_at with Z",
    ),
    pytest.param(
        {"stop_at": "2030-01-01T20:00:00+02:00"},
        ("cpu", {}, 0, datetime(2030, 1, 1, 18, tzinfo=UTC), None),
        id="stop_at with an offset is converted to UTC",
    ),
    pytest.param(
        {"stop_at": "2030-01-01T18:00:00"},
        ("cpu", {}, 0, datetime(2030, 1, 1, 18, tzinfo=UTC), None),
        id="naive stop_at is UTC",
    ),
    pytest.param({"stop_at": ""}, ("cpu", {}, 0, None, None), id="empty stop_at is none"),
    pytest.param(
        {"run_hours": 2, "stop_at": "2030-01-01T18:00:00Z"},
        ("cpu", {}, 0, NOW + timedelta(hours=2), 2.0),
        id="run_hours wins over stop_at",
    ),
    pytest.param(
        {"run_hours": 2, "stop_at": "not a time"},
        ("cpu", {}, 0, NOW + timedelta(hours=2), 2.0),
        id="run_hours wins over a bad stop_at",
    ),
]


def _summary(selection: Selection) -> tuple[Any, ...]:
    return (
        selection.profile.slug,
        {name: choice.slug for name, choice in selection.choices.items()},
        selection.gpus,
        selection.stop_at,
        selection.run_hours,
    )


@pytest.mark.parametrize(("user_options", "expected"), GOOD_OPTIONS)
def test_resolve_options_good(user_options: Any, expected: tuple[Any, ...]) -> None:
    selection = resolve_options(PROFILES, user_options, now=NOW, max_run_hours=MAX_RUN_HOURS)
    assert _summary(selection) == expected


def test_resolve_options_no_maximum() -> None:
    selection = resolve_options(PROFILES, {"run_hours": 1000}, now=NOW, max_run_hours=0)
    assert selection.stop_at == NOW + timedelta(hours=1000)


def test_resolve_options_first_profile_without_default() -> None:
    profiles = parse_profile_list([{"display_name": "First"}, {"display_name": "Second"}])
    assert resolve_options(profiles, {}).profile.slug == "first"


def test_resolve_options_uses_the_clock_without_now() -> None:
    before = datetime.now(UTC)
    selection = resolve_options(PROFILES, {"run_hours": 1})
    after = datetime.now(UTC)
    assert selection.stop_at is not None
    assert before + timedelta(hours=1) <= selection.stop_at <= after + timedelta(hours=1)


# ----- resolve_options: bad options -------------------------------------------------------------------------

BAD_OPTIONS = [
    pytest.param(["cpu"], 'user_options must be a JSON object such as {"profile": "cpu"}', id="not a dict"),
    pytest.param({"profile": "gpu"}, "Unknown profile 'gpu'. Choose one of: cpu, a100x2, gpu1.", id="unknown profile"),
    pytest.param({"profile": 1}, "profile must be a string, one of: cpu, a100x2, gpu1", id="profile not a string"),
    pytest.param(
        {"profile": "cpu", "image": "x"},
        "Unknown option(s) 'image' for profile 'cpu'; allowed: profile,",
        id="unknown key",
    ),
    pytest.param(
        {"profile": "a100x2", "env": "tensorflow"},
        "'tensorflow' is not a choice for 'env'; choose one of: system, torch.",
        id="unknown choice",
    ),
    pytest.param(
        {"profile": "a100x2", "env": ["torch"]}, "['torch'] is not a choice for 'env'", id="choice not a string"
    ),
    pytest.param(
        {"profile": "a100x2", "gpus": 3},
        "Profile 'a100x2' gives at most 2 GPU(s); ask for 1 to 2, not 3.",
        id="gpus over the profile's count",
    ),
    pytest.param({"profile": "a100x2", "gpus": 0}, "ask for 1 to 2, not 0", id="gpus 0"),
    pytest.param({"profile": "a100x2", "gpus": -1}, "ask for 1 to 2, not -1", id="gpus negative"),
    pytest.param(
        {"profile": "cpu", "gpus": 1},
        "Profile 'cpu' has no GPUs; leave gpus out or pick a GPU profile.",
        id="gpus on a CPU profile",
    ),
    pytest.param(
        {"profile": "a100x2", "gpus": True}, "gpus must be a whole number from 1 to 2, not True", id="gpus bool"
    ),
    pytest.param(
        {"profile": "a100x2", "gpus": 1.0}, "gpus must be a whole number from 1 to 2, not 1.0", id="gpus float"
    ),
    pytest.param(
        {"profile": "a100x2", "gpus": "abc"}, "gpus must be a whole number from 1 to 2, not 'abc'", id="gpus abc"
    ),
    pytest.param({"profile": "a100x2", "gpus": "1.5"}, "gpus must be a whole number", id="gpus decimal string"),
    pytest.param({"profile": "a100x2", "gpus": ""}, "gpus must be a whole number", id="gpus empty string"),
    pytest.param(
        {"stop_at": "2030-01-01T11:00:00Z"},
        "The stop time 2030-01-01T11:00:00Z is in the past; choose a time at most 24 hours from now (UTC).",
        id="stop_at in the past",
    ),
    pytest.param({"stop_at": "2030-01-01T12:00:30Z"}, "is in the past", id="stop_at within a minute"),
    pytest.param(
        {"stop_at": "2030-01-02T12:00:01Z"},
        "The stop time 2030-01-02T12:00:01Z is too far ahead; choose a time at most 24 hours from now (UTC).",
        id="stop_at past max_run_hours",
    ),
    pytest.param(
        {"stop_at": "tomorrow"},
        "stop_at 'tomorrow' is not an ISO 8601 time; write it like 2030-01-31T18:00:00Z (UTC)",
        id="stop_at not ISO",
    ),
    pytest.param({"stop_at": 1893520800}, "stop_at must be an ISO 8601 time string such as", id="stop_at wrong type"),
    pytest.param({"run_hours": 0}, "run_hours must be more than 0", id="run_hours 0"),
    pytest.param({"run_hours": -1}, "run_hours must be more than 0", id="run_hours negative"),
    pytest.param({"run_hours": 25}, "You can run a server for at most 24 hours, not 25.", id="run_hours over max"),
    pytest.param({"run_hours": "abc"}, "run_hours must be a number of hours, not 'abc'", id="run_hours abc"),
    pytest.param({"run_hours": float("nan")}, "run_hours must be a number of hours, not nan", id="run_hours NaN"),
    pytest.param({"run_hours": "nan"}, "run_hours must be a number of hours", id="run_hours NaN string"),
    pytest.param({"run_hours": float("inf")}, "run_hours must be a number of hours, not inf", id="run_hours inf"),
    pytest.param({"run_hours": "-inf"}, "run_hours must be a number of hours", id="run_hours -inf string"),
    pytest.param({"run_hours": True}, "run_hours must be a number of hours, not True", id="run_hours bool"),
    pytest.param({"run_hours": [1]}, "run_hours must be a number of hours", id="run_hours list"),
]


@pytest.mark.parametrize(("user_options", "phrase"), BAD_OPTIONS)
def test_resolve_options_bad(user_options: Any, phrase: str) -> None:
    with pytest.raises(OptionsError) as info:
        resolve_options(PROFILES, user_options, now=NOW, max_run_hours=MAX_RUN_HOURS)
    assert phrase in str(info.value)


def test_resolve_options_without_profiles() -> None:
    with pytest.raises(OptionsError, match="No profiles are configured"):
        resolve_options([], {})


def test_stop_at_in_the_past_without_maximum() -> None:
    with pytest.raises(OptionsError, match="choose a time in the future"):
        resolve_options(PROFILES, {"stop_at": "2029-12-31T00:00:00Z"}, now=NOW, max_run_hours=0)


def test_gpus_unicode_digit_is_an_options_error() -> None:
    with pytest.raises(OptionsError, match="gpus must be a whole number"):
        resolve_options(PROFILES, {"profile": "a100x2", "gpus": "²"}, now=NOW, max_run_hours=MAX_RUN_HOURS)


@pytest.mark.parametrize(
    ("user_options", "max_run_hours"),
    [
        ({"run_hours": 1e8}, 0),
        ({"run_hours": 1e12}, 0),
        ({"stop_at": "9999-12-31T23:00:00-05:00"}, MAX_RUN_HOURS),
    ],
    ids=["run_hours past year 9999", "run_hours past timedelta", "stop_at offset past year 9999"],
)
def test_out_of_range_times_are_options_errors(user_options: dict[str, Any], max_run_hours: float) -> None:
    with pytest.raises(OptionsError):
        resolve_options(PROFILES, user_options, now=NOW, max_run_hours=max_run_hours)


# ----- resolve_options: hostile input ----------------------------------------------------------------------

#: The local profiles and a RunPod one (its gpu_type and max_price_per_hour), as the REST API can reach them.
HOSTILE_PROFILES = parse_profile_list(
    [
        *PROFILE_LIST,
        {
            "display_name": "Pod",
            "slug": "pod",
            "backend": "runpod",
            "gpus": 2,
            "runpod": {"gpu_types": ["NVIDIA A100 80GB PCIe"], "image": "me/lab:1", "max_price_per_hour": 4},
        },
    ],
    backends=("local", "runpod"),
)


HUGE = st.sampled_from(
    [10**400, -(10**400), 2**63, 1e308, float("nan"), float("inf"), "1" * 5000, "9" * 64, "x" * 100_000, "²", " 1 "]
)


OPTION_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | HUGE,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


OPTION_KEYS = st.sampled_from(["profile", "gpus", "run_hours", "stop_at", "gpu_type", "max_price_per_hour", "env"])


@settings(max_examples=300, deadline=None, database=None)
@given(
    user_options=st.dictionaries(OPTION_KEYS | st.text(max_size=10), OPTION_VALUES, max_size=7)
    | st.fixed_dictionaries({"profile": st.sampled_from(["cpu", "a100x2", "pod"]), "gpus": HUGE, "run_hours": HUGE})
    | OPTION_VALUES,
    max_run_hours=st.sampled_from([0, 24]),
)
def test_hostile_user_options_are_a_selection_or_a_short_sentence(user_options: Any, max_run_hours: float) -> None:
    # Only OptionsError may come out (the spawner turns it into a 400); anything else is a 500 with a traceback.
    try:
        selection = resolve_options(HOSTILE_PROFILES, user_options, now=NOW, max_run_hours=max_run_hours)
    except OptionsError as e:
        assert len(str(e)) < 600, "a refusal quotes at most a short piece of what was sent"
        return
    assert selection.stop_at is None or selection.stop_at <= NOW + timedelta(hours=100_000)
    json.dumps(selection.user_options(), allow_nan=False)  # what the hub stores is plain, finite JSON


@pytest.mark.parametrize(
    "user_options",
    [
        pytest.param({"profile": "a100x2", "gpus": "1" * 5000}, id="gpus 5000 digits"),
        pytest.param({"run_hours": 10**400}, id="run_hours 10**400"),
        pytest.param({"run_hours": -(10**400)}, id="run_hours -10**400"),
        pytest.param({"profile": "pod", "max_price_per_hour": 10**400}, id="price 10**400"),
        pytest.param({"stop_at": "2" * 5000}, id="stop_at 5000 chars"),
        pytest.param({f"key{i}": 1 for i in range(1000)}, id="1000 keys"),
    ],
)
def test_the_reported_user_options_are_short_sentences(user_options: dict[str, Any]) -> None:
    with pytest.raises(OptionsError) as info:
        resolve_options(HOSTILE_PROFILES, user_options, now=NOW, max_run_hours=MAX_RUN_HOURS)
    assert len(str(info.value)) < 300, str(info.value)


# ----- Selection --------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    pytest.param({}, {"profile": "cpu"}, id="default"),
    pytest.param(
        {"profile": "a100x2", "env": "system", "gpus": "1"},
        {"profile": "a100x2", "env": "system", "gpus": 1},
        id="choice and gpus",
    ),
    pytest.param({"profile": "a100x2"}, {"profile": "a100x2", "env": "torch", "gpus": 2}, id="defaults filled in"),
    pytest.param(
        {"run_hours": "2"},
        {"profile": "cpu", "run_hours": 2.0, "stop_at": "2030-01-01T14:00:00Z"},
        id="run_hours and the stop time it gives",
    ),
    pytest.param(
        {"stop_at": "2030-01-01T20:00:00+02:00"},
        {"profile": "cpu", "stop_at": "2030-01-01T18:00:00Z"},
        id="stop_at normalised to UTC",
    ),
    pytest.param(
        {"run_hours": 1, "stop_at": "2030-01-01T18:00:00Z"},
        {"profile": "cpu", "run_hours": 1.0, "stop_at": "2030-01-01T13:00:00Z"},
        id="run_hours wins, stop_at recomputed",
    ),
]


@pytest.mark.parametrize(("user_options", "stored"), ROUND_TRIPS)
def test_user_options_round_trip(user_options: dict[str, Any], stored: dict[str, Any]) -> None:
    selection = resolve_options(PROFILES, user_options, now=NOW, max_run_hours=MAX_RUN_HOURS)
    normalised = selection.user_options()
    assert normalised == stored
    assert json.loads(json.dumps(normalised)) == normalised
    again = resolve_options(PROFILES, normalised, now=NOW, max_run_hours=MAX_RUN_HOURS)
    assert again == selection
    assert again.user_options() == normalised


@pytest.mark.parametrize(
    ("user_options", "expected"),
    [
        ({"profile": "cpu"}, {}),
        (
            {"profile": "a100x2", "env": "system"},
            {"mem_limit": "32G", "cpu_limit": 8},
        ),
        (
            {"profile": "a100x2", "env": "torch"},
            {"mem_limit": "64G", "cpu_limit": 8, "python_env": "/opt/torch"},
        ),
    ],
    ids=["no overrides", "profile only", "choice wins over profile"],
)
def test_selection_spawner_override(user_options: dict[str, Any], expected: dict[str, Any]) -> None:
    selection = resolve_options(PROFILES, user_options, now=NOW)
    merged = selection.spawner_override
    assert merged == expected
    merged["mem_limit"] = "1G"
    assert selection.profile.spawner_override.get("mem_limit") != "1G", "the profile's dict must not be changed"


def test_selection_spawner_override_choices_in_option_order() -> None:
    (profile,) = parse_profile_list(
        [
            {
                "display_name": "ML",
                "profile_options": {
                    "first": {"choices": {"a": {"spawner_override": {"mem_limit": "1G", "cpu_limit": 1}}}},
                    "second": {"choices": {"b": {"spawner_override": {"mem_limit": "2G"}}}},
                },
            }
        ]
    )
    selection = resolve_options([profile], {})
    assert selection.spawner_override == {"mem_limit": "2G", "cpu_limit": 1}


def test_selection_spawner_override_merges_dicts() -> None:
    (profile,) = parse_profile_list(
        [
            {
                "display_name": "ML",
                "spawner_override": {"environment": {"A": "1"}},
                "profile_options": {"env": {"choices": {"t": {"spawner_override": {"environment": {"B": "2"}}}}}},
            }
        ]
    )
    selection = resolve_options([profile], {})
    assert selection.spawner_override == {"environment": {"A": "1", "B": "2"}}


# ----- stop times -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-31T18:00:00Z", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        ("2030-01-31T18:00:00z", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        (" 2030-01-31T18:00:00Z ", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        ("2030-01-31T18:00:00+00:00", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        ("2030-01-31T20:30:00+02:30", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        ("2030-01-31T13:00:00-05:00", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        ("2030-01-31T18:00:00", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        ("2030-01-31T18:00", datetime(2030, 1, 31, 18, tzinfo=UTC)),
        ("2030-01-31T18:00:00.250Z", datetime(2030, 1, 31, 18, 0, 0, 250000, tzinfo=UTC)),
    ],
    ids=["Z", "lower z", "spaces", "+00:00", "+02:30", "-05:00", "naive", "no seconds", "fraction"],
)
def test_parse_stop_at(text: str, expected: datetime) -> None:
    parsed = parse_stop_at(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("31/01/2030 18:00", "is not an ISO 8601 time"),
        ("", "is not an ISO 8601 time"),
        (None, "must be an ISO 8601 time string"),
        (datetime(2030, 1, 1, tzinfo=UTC), "must be an ISO 8601 time string"),
    ],
    ids=["not ISO", "empty", "None", "a datetime"],
)
def test_parse_stop_at_bad(value: Any, phrase: str) -> None:
    with pytest.raises(OptionsError, match=phrase):
        parse_stop_at(value)


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (datetime(2030, 1, 31, 18, 0, 0, tzinfo=UTC), "2030-01-31T18:00:00Z"),
        (datetime(2030, 1, 31, 18, 0, 0, 999999, tzinfo=UTC), "2030-01-31T18:00:00Z"),
        (datetime(2030, 1, 31, 20, 0, 0, tzinfo=timezone(timedelta(hours=2))), "2030-01-31T18:00:00Z"),
    ],
    ids=["UTC", "microseconds dropped", "offset converted"],
)
def test_format_time(when: datetime, text: str) -> None:
    assert format_time(when) == text
    assert parse_stop_at(text) == when.astimezone(UTC).replace(microsecond=0)


def test_user_options_pick_the_first_gpu_type_and_a_lower_price() -> None:
    profiles = parse_profile_list([profile()], backends=BACKENDS)
    plain = resolve_options(profiles, {"profile": "pod"})
    assert plain.gpu_types == (A100, H100) and plain.price_cap_per_hour == 4
    picked = resolve_options(profiles, {"profile": "pod", "gpu_type": H100, "max_price_per_hour": "3.5", "gpus": 1})
    assert picked.gpu_types == (H100, A100) and picked.price_cap_per_hour == 3.5
    stored = picked.user_options()
    assert stored == {"profile": "pod", "gpus": 1, "gpu_type": H100, "max_price_per_hour": 3.5}
    assert resolve_options(profiles, stored).user_options() == stored
    request = pod_request(picked)
    assert request["gpu_types"] == [H100, A100] and request["gpu_count"] == 1 and request["max_price_per_hour"] == 3.5
    assert request["image"] == "me/lab:1" and request["cloud_type"] == "secure"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpu_type": "NVIDIA Tesla V100"}, "is not a GPU type of profile 'pod'"),
        ({"gpu_type": 3}, "is not a GPU type"),
        ({"max_price_per_hour": 4.01}, "at most $4 per hour"),
        ({"max_price_per_hour": 0}, "above 0"),
        ({"max_price_per_hour": "nan"}, "above 0"),
        ({"max_price_per_hour": True}, "above 0"),
        ({"gpus": 3}, "at most 2 GPU"),
    ],
)
def test_bad_user_options_are_refused(options: dict[str, Any], message: str) -> None:
    profiles = parse_profile_list([profile()], backends=BACKENDS)
    with pytest.raises(OptionsError, match=message.replace("$", r"\$")):
        resolve_options(profiles, {"profile": "pod", **options})


def test_other_profiles_take_no_runpod_options() -> None:
    profiles = parse_profile_list([{"display_name": "CPU", "slug": "cpu"}], backends=BACKENDS)
    with pytest.raises(OptionsError, match="Unknown option"):
        resolve_options(profiles, {"profile": "cpu", "gpu_type": A100})
