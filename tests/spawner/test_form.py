"""DoLabSpawner's options form (dolab_spawner.form), rendered and posted without a hub."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bs4 import BeautifulSoup, Tag
from traitlets import TraitError
from traitlets.config import Config

import dolab_spawner.reservations
from dolab_core.times import format_time
from dolab_spawner import DoLabSpawner
from tests.runpod_emulator.client import EmulatorProcess
from tests.spawner.test_profiles import A100, H100, profile

UTC = timezone.utc

PROFILE_LIST: list[dict[str, Any]] = [
    {"display_name": "CPU only", "slug": "cpu", "description": "No GPU.", "default": True},
    {
        "display_name": "Two A100",
        "slug": "a100x2",
        "gpus": 2,
        "gpu_type": "A100",
        "profile_options": {
            "env": {
                "display_name": "Python environment",
                "choices": {
                    "system": {"display_name": "System Python"},
                    "torch": {"display_name": "PyTorch", "default": True, "description": "CUDA <12> & torch"},
                },
            }
        },
    },
    {"display_name": "One H100", "slug": "h100", "gpus": 1, "gpu_type": "H100"},
]

GPU_INVENTORY = [
    {"index": 0, "uuid": "GPU-0000", "name": "NVIDIA A100-SXM4-80GB", "memory_gb": 80},
    {"index": 1, "uuid": "GPU-0001", "name": "NVIDIA A100-SXM4-80GB", "memory_gb": 80},
]


@pytest.fixture(autouse=True)
def fresh_pool() -> Iterator[dolab_spawner.reservations.SlotPool]:
    """Every test gets its own hub-wide slot table; the class-level one is put back after."""
    saved = DoLabSpawner._pool
    DoLabSpawner._pool = dolab_spawner.reservations.SlotPool()
    try:
        yield DoLabSpawner._pool
    finally:
        DoLabSpawner._pool = saved


def make_spawner(profile_list: Any = None, max_run_hours: float = 24, **traits: Any) -> DoLabSpawner:
    config = Config()
    config.DoLabSpawner.profile_list = PROFILE_LIST if profile_list is None else profile_list
    config.DoLabSpawner.gpu_inventory = GPU_INVENTORY
    config.DoLabSpawner.max_run_hours = max_run_hours
    for name, value in traits.items():
        config.DoLabSpawner[name] = value
    return DoLabSpawner(config=config)


async def render(spawner: DoLabSpawner) -> BeautifulSoup:
    return BeautifulSoup(await spawner.render_options_form(), "html.parser")


def card(soup: BeautifulSoup, slug: str) -> Tag:
    found = soup.find("div", class_="dolab-profile", attrs={"data-profile": slug})
    assert isinstance(found, Tag), f"no card for {slug}"
    return found


def submission(soup: BeautifulSoup, **changes: str) -> dict[str, list[str]]:
    """What a browser posts for the form as rendered, with ``changes`` made by the user (tornado's shape)."""
    data: dict[str, list[str]] = {}
    for field in soup.find_all(["input", "select"]):
        name = field.get("name")
        if not name:
            continue
        if field.name == "select":
            chosen = field.find("option", selected=True) or field.find("option")
            data.setdefault(name, []).append(chosen["value"] if chosen else "")
        elif field.get("type") == "radio":
            if field.has_attr("checked"):
                data[name] = [field["value"]]
        else:
            data.setdefault(name, []).append(field.get("value", ""))
    data.update({name: [value] for name, value in changes.items()})
    return data


# ----- rendering --------------------------------------------------------------------------------------------


async def test_one_radio_per_profile_and_the_default_checked() -> None:
    soup = await render(make_spawner())
    radios = soup.find_all("input", attrs={"name": "profile", "type": "radio"})
    assert [r["value"] for r in radios] == ["cpu", "a100x2", "h100"]
    assert [r["value"] for r in radios if r.has_attr("checked")] == ["cpu"]
    assert "CPU only" in card(soup, "cpu").get_text()
    assert card(soup, "cpu").find(class_="dolab-description").get_text(strip=True) == "No GPU."


async def test_previous_profile_is_checked() -> None:
    spawner = make_spawner()
    spawner.user_options = {"profile": "a100x2", "env": "system", "gpus": 1}
    soup = await render(spawner)
    checked = soup.find_all("input", attrs={"name": "profile", "checked": True})
    assert [r["value"] for r in checked] == ["a100x2"]
    select = card(soup, "a100x2").find("select")
    assert [o["value"] for o in select.find_all("option", selected=True)] == ["system"]


async def test_first_profile_checked_without_a_default() -> None:
    soup = await render(make_spawner([{"display_name": "A"}, {"display_name": "B"}]))
    checked = soup.find_all("input", attrs={"name": "profile", "checked": True})
    assert [r["value"] for r in checked] == ["a"]


def availability(soup: BeautifulSoup, slug: str) -> Tag | None:
    found = card(soup, slug).find(class_="dolab-availability")
    return found if isinstance(found, Tag) else None


async def test_availability_follows_the_shared_allocator() -> None:
    spawner = make_spawner()
    soup = await render(spawner)
    assert availability(soup, "cpu") is None
    a100 = availability(soup, "a100x2")
    assert a100 is not None
    assert " ".join(a100.get_text().split()) == "2 of 2 GPUs free"
    assert (a100["data-free"], a100["data-total"]) == ("2", "2")
    assert "dolab-none-free" not in a100["class"]
    h100 = availability(soup, "h100")
    assert h100 is not None
    assert " ".join(h100.get_text().split()) == "no matching GPU on this server"

    DoLabSpawner._pool.allocator.allocate("someone/", 1, "A100")
    soup = await render(make_spawner())
    a100 = availability(soup, "a100x2")
    assert a100 is not None
    assert " ".join(a100.get_text().split()) == "1 of 2 GPUs free"
    assert "dolab-none-free" in a100["class"], "fewer free than the profile's 2 GPUs"


async def test_inventory_is_read_once_per_pool(fresh_pool: dolab_spawner.reservations.SlotPool) -> None:
    await render(make_spawner())
    assert fresh_pool.loaded
    assert [s.uuid for s in fresh_pool.allocator.inventory] == ["GPU-0000", "GPU-0001"]
    # A second spawner with another inventory shares the table already read.
    other = make_spawner(gpu_inventory=[{"index": 0, "uuid": "GPU-x", "name": "Other"}])
    await render(other)
    assert [s.uuid for s in fresh_pool.allocator.inventory] == ["GPU-0000", "GPU-0001"]


async def test_option_selects_with_the_default_choice() -> None:
    soup = await render(make_spawner())
    selects = soup.find_all("select")
    assert [s["name"] for s in selects] == ["profile-option-a100x2--env"]
    options = selects[0].find_all("option")
    assert [(o["value"], o.get_text(strip=True)) for o in options] == [
        ("system", "System Python"),
        ("torch", "PyTorch"),
    ]
    assert [o["value"] for o in options if o.has_attr("selected")] == ["torch"]
    assert options[1]["title"] == "CUDA <12> & torch"
    assert "Python environment" in selects[0].parent.get_text()


async def test_gpus_input_only_for_multi_gpu_profiles() -> None:
    soup = await render(make_spawner())
    inputs = soup.find_all("input", attrs={"type": "number", "name": lambda n: n and n.startswith("gpus-")})
    assert [(i["name"], i["min"], i["max"], i["value"]) for i in inputs] == [("gpus-a100x2", "1", "2", "2")]
    assert card(soup, "a100x2").find("input", attrs={"name": "gpus-a100x2"}) is not None
    assert card(soup, "h100").find("input", attrs={"type": "number"}) is None
    assert card(soup, "cpu").find(class_="dolab-options") is None


async def test_stop_time_controls() -> None:
    soup = await render(make_spawner(max_run_hours=12))
    modes = soup.find_all("input", attrs={"name": "stop_mode", "type": "radio"})
    assert [m["value"] for m in modes] == ["none", "hours", "at"]
    assert [m["value"] for m in modes if m.has_attr("checked")] == ["none"]
    run_hours = soup.find("input", attrs={"name": "run_hours"})
    assert (run_hours["type"], float(run_hours["max"]), run_hours["value"]) == ("number", 12.0, "4")
    stop_at = soup.find("input", attrs={"name": "stop_at"})
    assert stop_at["type"] == "datetime-local"
    now = datetime.now(UTC).replace(tzinfo=None)
    earliest = datetime.fromisoformat(stop_at["min"])
    latest = datetime.fromisoformat(stop_at["max"])
    assert abs(earliest - now) < timedelta(minutes=2)
    assert abs(latest - (now + timedelta(hours=12))) < timedelta(minutes=2)
    tz = soup.find("input", attrs={"name": "tz_offset_minutes"})
    assert (tz["type"], tz["value"]) == ("hidden", "")
    assert "At most 12 hours from now." in soup.get_text()


async def test_stop_time_without_maximum() -> None:
    soup = await render(make_spawner(max_run_hours=0))
    assert not soup.find("input", attrs={"name": "run_hours"}).has_attr("max")
    assert not soup.find("input", attrs={"name": "stop_at"}).has_attr("max")
    assert soup.find(class_="dolab-hint") is None


@pytest.mark.parametrize(
    ("previous", "checked", "run_hours"),
    [
        ({"profile": "cpu", "run_hours": 2.5, "stop_at": "2030-01-01T00:00:00Z"}, "hours", "2.5"),
        ({"profile": "cpu", "stop_at": "2030-01-01T00:00:00Z"}, "at", "4"),
        ({"profile": "cpu"}, "none", "4"),
    ],
    ids=["run_hours", "stop_at", "none"],
)
async def test_previous_stop_mode(previous: dict[str, Any], checked: str, run_hours: str) -> None:
    spawner = make_spawner()
    spawner.user_options = previous
    soup = await render(spawner)
    modes = soup.find_all("input", attrs={"name": "stop_mode", "checked": True})
    assert [m["value"] for m in modes] == [checked]
    assert soup.find("input", attrs={"name": "run_hours"})["value"] == run_hours


async def test_display_names_are_escaped() -> None:
    hostile = "<script>alert('x')</script> & <b>bold</b>"
    profiles = [
        {"display_name": hostile, "slug": "evil", "description": "<img src=x onerror=alert(1)>"},
        {
            "display_name": "Opts",
            "slug": "opts",
            "profile_options": {"env": {"display_name": "<i>env</i>", "choices": {"a": {"display_name": "<u>A</u>"}}}},
        },
    ]
    html = await make_spawner(profiles).render_options_form()
    assert "&lt;script&gt;alert(" in html
    soup = BeautifulSoup(html, "html.parser")
    evil = card(soup, "evil")
    assert evil.find("script") is None
    assert evil.find("img") is None
    assert evil.find("b") is None
    assert hostile in evil.find("label").get_text()
    assert "<img src=x onerror=alert(1)>" in evil.find(class_="dolab-description").get_text()
    opts = card(soup, "opts")
    assert opts.find("i") is None and opts.find("u") is None
    assert opts.find("option").get_text(strip=True) == "<u>A</u>"
    # The form's own script is the only one.
    assert len(soup.find_all("script")) == 1


# ----- options_from_form ------------------------------------------------------------------------------------


async def test_submitting_the_form_as_rendered() -> None:
    spawner = make_spawner()
    soup = await render(spawner)
    assert await spawner.options_from_form(submission(soup)) == {"profile": "cpu"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"profile": "a100x2"}, {"profile": "a100x2", "env": "torch", "gpus": 2}),
        (
            {"profile": "a100x2", "profile-option-a100x2--env": "system", "gpus-a100x2": "1"},
            {"profile": "a100x2", "env": "system", "gpus": 1},
        ),
        ({"profile": "h100"}, {"profile": "h100", "gpus": 1}),
        ({"profile": "cpu", "stop_mode": "none", "run_hours": "3"}, {"profile": "cpu"}),
        ({"profile": "cpu", "stop_mode": "at", "stop_at": ""}, {"profile": "cpu"}),
        ({"profile": "cpu", "stop_mode": "hours", "run_hours": ""}, {"profile": "cpu"}),
        ({"profile": ""}, {"profile": "cpu"}),
    ],
    ids=[
        "gpu profile defaults",
        "choice and gpus",
        "one-GPU profile",
        "hours ignored",
        "empty stop_at",
        "empty hours",
        "no profile",
    ],
)
async def test_options_from_form(changes: dict[str, str], expected: dict[str, Any]) -> None:
    spawner = make_spawner()
    soup = await render(spawner)
    assert await spawner.options_from_form(submission(soup, **changes)) == expected


async def test_options_from_form_run_hours() -> None:
    spawner = make_spawner()
    soup = await render(spawner)
    form = submission(
        soup, profile="a100x2", **{"profile-option-a100x2--env": "system", "gpus-a100x2": " 1 "}, stop_mode="hours"
    )
    form["run_hours"] = ["2.5"]
    before = datetime.now(UTC).replace(microsecond=0)
    options = await spawner.options_from_form(form)
    after = datetime.now(UTC)
    stop_at = datetime.fromisoformat(options.pop("stop_at").replace("Z", "+00:00"))
    assert options == {"profile": "a100x2", "env": "system", "gpus": 1, "run_hours": 2.5}
    assert before + timedelta(hours=2.5) <= stop_at <= after + timedelta(hours=2.5)


@pytest.mark.parametrize(
    ("offset_hours", "tz_offset_minutes"),
    [(2, "-120"), (-5, "300"), (5.5, "-330"), (0, "0"), (0, ""), (0, "not a number"), (0, "9" * 20), (0, "-5000")],
    ids=["UTC+2", "UTC-5", "UTC+5:30", "UTC", "no JavaScript", "garbage offset", "huge offset", "days away"],
)
async def test_options_from_form_stop_at_local_time(offset_hours: float, tz_offset_minutes: str) -> None:
    spawner = make_spawner()
    soup = await render(spawner)
    when_utc = (datetime.now(UTC) + timedelta(hours=3)).replace(second=0, microsecond=0)
    local = (when_utc + timedelta(hours=offset_hours)).strftime("%Y-%m-%dT%H:%M")
    form = submission(soup, stop_mode="at", stop_at=local, tz_offset_minutes=tz_offset_minutes)
    assert await spawner.options_from_form(form) == {"profile": "cpu", "stop_at": format_time(when_utc)}


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"profile": "gpu"}, "Unknown profile 'gpu'. Choose one of: cpu, a100x2, h100."),
        ({"stop_mode": "hours", "run_hours": "25"}, "You can run a server for at most 24 hours, not 25."),
        ({"stop_mode": "hours", "run_hours": "soon"}, "run_hours must be a number of hours, not 'soon'"),
        ({"profile": "a100x2", "gpus-a100x2": "3"}, "Profile 'a100x2' gives at most 2 GPU(s)"),
        ({"profile": "a100x2", "profile-option-a100x2--env": "jax"}, "'jax' is not a choice for 'env'"),
        ({"stop_mode": "at", "stop_at": "2000-01-01T00:00", "tz_offset_minutes": "0"}, "is in the past"),
        ({"stop_mode": "at", "stop_at": "tomorrow"}, "is not an ISO 8601 time"),
        ({"stop_mode": "at", "stop_at": "9999-12-31T23:59", "tz_offset_minutes": "600"}, "out of range"),
    ],
    ids=[
        "unknown profile",
        "run_hours over max",
        "run_hours not a number",
        "too many gpus",
        "unknown choice",
        "stop_at in the past",
        "stop_at not a time",
        "stop_at at the end of time",
    ],
)
async def test_options_from_form_bad(changes: dict[str, str], phrase: str) -> None:
    spawner = make_spawner()
    soup = await render(spawner)
    with pytest.raises(ValueError) as info:
        await spawner.options_from_form(submission(soup, **changes))
    assert phrase in str(info.value)


async def test_options_from_form_ignores_other_profiles_fields() -> None:
    spawner = make_spawner()
    soup = await render(spawner)
    form = submission(soup, profile="h100", **{"profile-option-a100x2--env": "jax", "gpus-a100x2": "9"})
    assert await spawner.options_from_form(form) == {"profile": "h100", "gpus": 1}


def test_slug_with_double_dash_is_refused() -> None:
    # Form fields are named profile-option-<slug>--<option>: "a--x" would read as profile "a", option "x--...".
    option = {"choices": {"one": {}, "two": {}}}
    with pytest.raises(TraitError, match="no '--'"):
        make_spawner(
            [
                {"display_name": "A", "slug": "a", "profile_options": {"env": option}},
                {"display_name": "A X", "slug": "a--x", "profile_options": {"img": option}},
            ]
        )


@pytest.fixture
def prices_from(record_emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    old = os.environ.get("RUNPOD_API_BASE_URL")
    os.environ["RUNPOD_API_BASE_URL"] = record_emulator.url
    record_emulator.reset()
    yield record_emulator
    if old is None:
        os.environ.pop("RUNPOD_API_BASE_URL", None)
    else:
        os.environ["RUNPOD_API_BASE_URL"] = old


async def test_the_form_shows_live_prices_and_never_the_key(prices_from: EmulatorProcess) -> None:
    config = Config()
    config.DoLabSpawner.profile_list = [{"display_name": "CPU", "slug": "cpu"}, profile(cloud_type="community")]
    config.DoLabSpawner.gpu_inventory = []
    config.RunPodBackend.api_key = prices_from.api_key
    prices_from.prices({H100: {"communityPrice": 2.5}})
    html = await DoLabSpawner(config=config).render_options_form()
    assert prices_from.api_key not in html
    card = BeautifulSoup(html, "html.parser").find("div", attrs={"data-profile": "pod"})
    assert isinstance(card, Tag)
    select = card.find("select", attrs={"name": "gpu_type-pod"})
    assert isinstance(select, Tag)
    options = {str(o["value"]): (str(o["data-price-per-hour"]), o.get_text(" ", strip=True)) for o in select("option")}
    # Prices per pod-hour: two GPUs at the community price.
    assert options[A100][0] == "2.38" and "$2.38 per hour for 2 GPUs" in options[A100][1]
    assert options[H100][0] == "5.0"
    assert "community cloud" in card.get_text() and "at most $4.00 per hour" in card.get_text()
    form = {"profile": ["pod"], "gpu_type-pod": [H100], "gpus-pod": ["1"], "stop_mode": ["none"]}
    options_posted = await DoLabSpawner(config=config).options_from_form(form)
    assert options_posted == {"profile": "pod", "gpus": 1, "gpu_type": H100}
