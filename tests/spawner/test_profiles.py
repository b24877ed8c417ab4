"""Unit tests for dolab_spawner.profiles: the admin's profile_list and the default profiles (a user's options:
tests/spawner/test_options.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from dolab_core.gpus import GpuSlot
from dolab_spawner.options import resolve_options
from dolab_spawner.profiles import (
    Choice,
    Profile,
    ProfileConfigError,
    ProfileOption,
    default_profiles,
    parse_profile_list,
    slugify,
)
from dolab_spawner.slots import SlotAllocator

UTC = timezone.utc
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
MAX_RUN_HOURS = 24

ENV_OPTION = {
    "display_name": "Python environment",
    "choices": {
        "system": {"display_name": "System Python"},
        "torch": {
            "display_name": "PyTorch",
            "description": "CUDA 12 and PyTorch",
            "default": True,
            "spawner_override": {"python_env": "/opt/torch", "mem_limit": "64G"},
        },
    },
}

PROFILE_LIST: list[dict[str, Any]] = [
    {"display_name": "CPU only", "slug": "cpu", "default": True},
    {
        "display_name": "Two A100",
        "slug": "a100x2",
        "gpus": 2,
        "gpu_type": "A100",
        "spawner_override": {"mem_limit": "32G", "cpu_limit": 8},
        "profile_options": {"env": ENV_OPTION},
    },
    {"display_name": "One GPU", "slug": "gpu1", "gpus": 1},
]
PROFILES = parse_profile_list(PROFILE_LIST)


# ----- parse_profile_list: good configs ---------------------------------------------------------------------

GOOD_CONFIGS = [
    pytest.param([], [], id="empty list"),
    pytest.param(
        [{"display_name": "CPU only"}],
        [Profile(slug="cpu-only", display_name="CPU only")],
        id="slug derived from display_name, defaults",
    ),
    pytest.param(
        [{"display_name": "One A100 (80 GB)!"}],
        [Profile(slug="one-a100-80-gb", display_name="One A100 (80 GB)!")],
        id="slug derived like kubespawner: lower case, runs of other characters become one -",
    ),
    pytest.param(
        ({"display_name": "CPU", "slug": "cpu", "description": "No GPU.", "default": True, "backend": "local"},),
        [Profile(slug="cpu", display_name="CPU", description="No GPU.", default=True, backend="local")],
        id="a tuple, explicit slug, description, default, backend",
    ),
    pytest.param(
        [{"display_name": "A100 pair", "slug": "a100_x2", "gpus": 2, "gpu_type": "A100"}],
        [Profile(slug="a100_x2", display_name="A100 pair", gpus=2, gpu_type="A100")],
        id="gpus and gpu_type",
    ),
    pytest.param(
        [{"display_name": "Any GPU", "gpus": 1}],
        [Profile(slug="any-gpu", display_name="Any GPU", gpus=1)],
        id="gpus without gpu_type",
    ),
    pytest.param(
        [{"display_name": "Big", "slug": "big", "spawner_override": {"mem_limit": "64G"}}],
        [Profile(slug="big", display_name="Big", spawner_override={"mem_limit": "64G"})],
        id="spawner_override",
    ),
    pytest.param(
        [{"display_name": "ML", "slug": "ml", "profile_options": {"env": ENV_OPTION}}],
        [
            Profile(
                slug="ml",
                display_name="ML",
                options=(
                    ProfileOption(
                        name="env",
                        display_name="Python environment",
                        choices=(
                            Choice(slug="system", display_name="System Python"),
                            Choice(
                                slug="torch",
                                display_name="PyTorch",
                                description="CUDA 12 and PyTorch",
                                default=True,
                                spawner_override={"python_env": "/opt/torch", "mem_limit": "64G"},
                            ),
                        ),
                    ),
                ),
            )
        ],
        id="profile_options with choices and a default choice",
    ),
    pytest.param(
        [{"display_name": "ML", "slug": "ml", "profile_options": {"image_2": {"choices": {"a": {}, "b": {}}}}}],
        [
            Profile(
                slug="ml",
                display_name="ML",
                options=(
                    ProfileOption(
                        name="image_2",
                        display_name="image_2",
                        choices=(Choice(slug="a", display_name="a"), Choice(slug="b", display_name="b")),
                    ),
                ),
            )
        ],
        id="option and choice display names default to their keys",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD_CONFIGS)
def test_parse_profile_list_good(raw: Any, expected: list[Profile]) -> None:
    assert parse_profile_list(raw) == expected


def test_parse_profile_list_default_choice() -> None:
    (profile,) = parse_profile_list([{"display_name": "ML", "profile_options": {"env": ENV_OPTION}}])
    option = profile.option("env")
    assert option is not None
    assert option.default_choice.slug == "torch"
    assert option.choice("system") == Choice(slug="system", display_name="System Python")
    assert option.choice("nope") is None
    assert profile.option("nope") is None


def test_default_choice_is_the_first_without_a_default() -> None:
    (profile,) = parse_profile_list(
        [{"display_name": "ML", "profile_options": {"env": {"choices": {"b": {}, "a": {}}}}}]
    )
    assert profile.options[0].default_choice.slug == "b"


def test_allowed_overrides_accepts_known_traits() -> None:
    raw = [
        {
            "display_name": "Big",
            "spawner_override": {"mem_limit": "64G"},
            "profile_options": {"env": {"choices": {"t": {"spawner_override": {"python_env": "/opt/t"}}}}},
        }
    ]
    (profile,) = parse_profile_list(raw, allowed_overrides={"local": {"mem_limit", "python_env"}})
    assert profile.spawner_override == {"mem_limit": "64G"}
    assert profile.options[0].choices[0].spawner_override == {"python_env": "/opt/t"}


def test_other_backend_when_known() -> None:
    (profile,) = parse_profile_list(
        [{"display_name": "Pod", "backend": "kubernetes"}], backends=("local", "kubernetes")
    )
    assert profile.backend == "kubernetes"


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("CPU only", "cpu-only"),
        ("  Two  A100s -- big ", "two-a100s-big"),
        ("ÄÖÜ", "profile"),
        ("", "profile"),
        ("GPU_x", "gpu-x"),
    ],
    ids=["spaces", "runs and edges", "nothing ascii left", "empty", "underscore"],
)
def test_slugify(text: str, slug: str) -> None:
    assert slugify(text) == slug


# ----- parse_profile_list: bad configs ----------------------------------------------------------------------


def _with_option(option: Any, name: str = "env") -> list[dict[str, Any]]:
    return [{"display_name": "ML", "slug": "ml", "profile_options": {name: option}}]


BAD_CONFIGS = [
    pytest.param({"display_name": "x"}, None, "profile_list must be a list of dicts, not dict", id="not a list"),
    pytest.param("cpu", None, "profile_list must be a list of dicts, not str", id="a string"),
    pytest.param(["cpu"], None, "profile_list[0]: each profile must be a dict, not str", id="entry not a dict"),
    pytest.param(
        [{"display_name": "x", "kubespawner_override": {}}],
        None,
        "profile_list[0]: unknown key(s) 'kubespawner_override'; allowed: backend, default",
        id="unknown key",
    ),
    pytest.param(
        [{"slug": "cpu"}], None, "profile_list[0]: display_name must be a non-empty string", id="missing display_name"
    ),
    pytest.param([{"display_name": "  "}], None, "display_name must be a non-empty string", id="blank display_name"),
    pytest.param(
        [{"display_name": "x", "slug": "Big GPU"}],
        None,
        "slug 'Big GPU' must be lower-case letters, digits, - and _",
        id="bad slug",
    ),
    pytest.param(
        [{"display_name": "x", "slug": "-x"}], None, "slug '-x' must be lower-case", id="slug starting with -"
    ),
    pytest.param([{"display_name": "x", "slug": 3}], None, "slug must be a non-empty string", id="slug not a string"),
    pytest.param(
        [{"display_name": "CPU"}, {"display_name": "cpu"}],
        None,
        "profile_list: slug(s) cpu used more than once",
        id="duplicate slug",
    ),
    pytest.param(
        [{"display_name": "a", "default": True}, {"display_name": "b", "default": True}],
        None,
        "only one profile may say default: True",
        id="two defaults",
    ),
    pytest.param(
        [{"display_name": "a", "default": "yes"}], None, "default must be true or false", id="default not a bool"
    ),
    pytest.param(
        [{"display_name": "a", "backend": "runpod"}],
        None,
        "profile 'a': backend 'runpod' is not available; this install has: local",
        id="unknown backend",
    ),
    pytest.param([{"display_name": "a", "gpus": -1}], None, "gpus must be a whole number from 0 to 64", id="gpus -1"),
    pytest.param([{"display_name": "a", "gpus": 65}], None, "gpus must be a whole number from 0 to 64", id="gpus 65"),
    pytest.param(
        [{"display_name": "a", "gpus": True}],
        None,
        "gpus must be a whole number from 0 to 64, not True",
        id="gpus bool",
    ),
    pytest.param(
        [{"display_name": "a", "gpus": "2"}], None, "gpus must be a whole number from 0 to 64, not '2'", id="gpus str"
    ),
    pytest.param([{"display_name": "a", "gpus": 1.0}], None, "gpus must be a whole number", id="gpus float"),
    pytest.param(
        [{"display_name": "a", "gpu_type": "A100"}],
        None,
        "profile 'a': gpu_type is set but gpus is 0; set gpus to 1 or more",
        id="gpu_type without gpus",
    ),
    pytest.param(
        [{"display_name": "a", "spawner_override": ["mem_limit"]}],
        None,
        "spawner_override must be a dict of trait names to values",
        id="spawner_override not a dict",
    ),
    pytest.param(
        [{"display_name": "a", "profile_options": ["env"]}],
        None,
        "profile_options must be a dict of option name -> option",
        id="profile_options not a dict",
    ),
    pytest.param(
        _with_option(ENV_OPTION, name="gpus"),
        None,
        "option name 'gpus' must be lower-case letters, digits and _",
        id="option name reserved",
    ),
    pytest.param(
        _with_option(ENV_OPTION, name="profile"), None, "and not one of profile, gpus", id="option name profile"
    ),
    pytest.param(
        _with_option(ENV_OPTION, name="Python-Env"),
        None,
        "option name 'Python-Env' must be lower-case letters",
        id="option name invalid",
    ),
    pytest.param(_with_option("torch"), None, "option 'env': must be a dict", id="option not a dict"),
    pytest.param(
        _with_option({"choices": {}}), None, "choices must be a non-empty dict of slug -> choice", id="empty choices"
    ),
    pytest.param(_with_option({"display_name": "Env"}), None, "choices must be a non-empty dict", id="missing choices"),
    pytest.param(
        _with_option({"choices": {"a": {}}, "default": "a"}),
        None,
        "option 'env': unknown key(s) 'default'",
        id="option key",
    ),
    pytest.param(
        _with_option({"choices": {"a": {"display_name": "A", "image": "x"}}}),
        None,
        "choice 'a': unknown key(s) 'image'",
        id="unknown choice key",
    ),
    pytest.param(_with_option({"choices": {"a": "A"}}), None, "choice 'a': must be a dict", id="choice not a dict"),
    pytest.param(
        _with_option({"choices": {"a": {"default": True}, "b": {"default": True}}}),
        None,
        "option 'env': only one choice may say default: True",
        id="two default choices",
    ),
    pytest.param(
        [{"display_name": "a", "spawner_override": {"mem_limit": "1G", "memory": "2G"}}],
        {"local": {"mem_limit"}},
        "profile 'a': spawner_override sets memory, which the spawner does not have",
        id="spawner_override unknown trait",
    ),
    pytest.param(
        _with_option({"choices": {"t": {"spawner_override": {"python_envs": "/opt/t"}}}}),
        {"local": {"python_env"}},
        "choice 't': spawner_override sets python_envs, which the spawner does not have",
        id="choice spawner_override unknown trait",
    ),
]


@pytest.mark.parametrize(("raw", "allowed_overrides", "phrase"), BAD_CONFIGS)
def test_parse_profile_list_bad(raw: Any, allowed_overrides: Any, phrase: str) -> None:
    with pytest.raises(ProfileConfigError) as info:
        parse_profile_list(raw, allowed_overrides=allowed_overrides)
    assert phrase in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        [{"display_name": "x", "slug": "cpu\n"}],
        _with_option(ENV_OPTION, name="env\n"),
    ],
    ids=["slug", "option name"],
)
def test_trailing_newline_is_refused(raw: Any) -> None:
    with pytest.raises(ProfileConfigError):
        parse_profile_list(raw)


# ----- default_profiles -------------------------------------------------------------------------------------


def _slot(index: int, name: str, memory_gb: float = 80) -> GpuSlot:
    return GpuSlot(index=index, uuid=f"GPU-{index:04d}", name=name, memory_gb=memory_gb)


def test_default_profiles_without_gpus() -> None:
    assert default_profiles([]) == [
        Profile(slug="cpu", display_name="CPU only", description="JupyterLab without a GPU.", default=True)
    ]


def test_default_profiles_one_per_model() -> None:
    inventory = [
        _slot(0, "NVIDIA A100-SXM4-80GB"),
        _slot(1, "NVIDIA H100 80GB HBM3", 79.6),
        _slot(2, "NVIDIA A100-SXM4-80GB"),
        _slot(3, "Fake GPU", 0),
    ]
    profiles = default_profiles(inventory)
    assert [(p.slug, p.display_name, p.gpus, p.gpu_type, p.default) for p in profiles] == [
        ("cpu", "CPU only", 0, "", True),
        ("gpu-nvidia-a100-sxm4-80gb", "One NVIDIA A100-SXM4-80GB", 1, "NVIDIA A100-SXM4-80GB", False),
        ("gpu-nvidia-h100-80gb-hbm3", "One NVIDIA H100 80GB HBM3", 1, "NVIDIA H100 80GB HBM3", False),
        ("gpu-fake-gpu", "One Fake GPU", 1, "Fake GPU", False),
    ]
    assert profiles[1].description == "JupyterLab with one NVIDIA A100-SXM4-80GB with 80 GB of memory."
    assert profiles[2].description == "JupyterLab with one NVIDIA H100 80GB HBM3 with 79.6 GB of memory."
    assert profiles[3].description == "JupyterLab with one Fake GPU."
    for profile in profiles[1:]:
        assert [s.index for s in inventory if s.matches(profile.gpu_type)] == [
            s.index for s in inventory if s.name == profile.gpu_type
        ]
    # The generated profiles are valid input for resolve_options.
    assert resolve_options(profiles, {"profile": "gpu-nvidia-h100-80gb-hbm3"}).gpus == 1


def test_default_profile_matches_only_its_model() -> None:
    inventory = [_slot(0, "NVIDIA GeForce RTX 4090", 24), _slot(1, "NVIDIA GeForce RTX 4090 D", 24)]
    profile = default_profiles(inventory)[1]
    assert profile.gpu_type == "NVIDIA GeForce RTX 4090"
    assert [s.index for s in inventory if s.matches(profile.gpu_type, profile.gpu_exact)] == [0]
    allocator = SlotAllocator(inventory)
    assert allocator.availability(profile.gpu_type, profile.gpu_exact) == (1, 1)
    assert [s.index for s in allocator.allocate("u/", 1, profile.gpu_type, profile.gpu_exact)] == [0]


A100 = "NVIDIA A100 80GB PCIe"


H100 = "NVIDIA H100 80GB HBM3"


BACKENDS = ("local", "docker", "runpod")


def profile(**runpod: Any) -> dict[str, Any]:
    settings = {"gpu_types": [A100, H100], "image": "me/lab:1", "max_price_per_hour": 4, **runpod}
    return {"display_name": "Pod", "slug": "pod", "backend": "runpod", "gpus": 2, "runpod": settings}


def test_a_runpod_profile_is_parsed_with_its_defaults() -> None:
    (p,) = parse_profile_list([profile()], backends=BACKENDS)
    assert p.runpod is not None
    assert p.runpod.gpu_types == (A100, H100) and p.runpod.cloud_type == "secure"
    assert (p.runpod.container_disk_gb, p.runpod.volume_gb, p.runpod.volume_mount_path) == (20, 0, "/workspace")
    assert p.allowed_keys[-2:] == ["gpu_type", "max_price_per_hour"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (profile(gpu_types=[]), "gpu_types must be a list"),
        (profile(gpu_types=[A100, A100]), "each once"),
        (profile(cloud_type="cheap"), "cloud_type must be one of secure, community, all"),
        (profile(image=""), "image must be a non-empty string"),
        (profile(max_price_per_hour=-1), "max_price_per_hour must be a number of at least 0"),
        (profile(container_disk_gb=2.5), "whole numbers"),
        (profile(volume_mount_path="data"), "absolute path"),
        (profile(region="eu"), "unknown key(s) 'region'"),
        ({**profile(), "gpus": 0}, "needs gpus"),
        ({**profile(), "gpu_type": "A100"}, "not in gpu_type"),
        ({"display_name": "CPU", "runpod": {"gpu_types": [A100]}}, "only for backend: runpod"),
        ({"display_name": "Pod", "backend": "runpod", "gpus": 1}, "must be a dict with gpu_types and image"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_runpod_settings_are_refused_with_a_sentence(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_profile_list([entry], backends=BACKENDS)
