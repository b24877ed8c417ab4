"""Unit tests for dolab_spawner.backends.docker_user: the container's user, never root however it is spelled."""

from __future__ import annotations

import pytest

from dolab_spawner.backends.docker_user import run_as_uid

# ----- the container's user: never root, however it is spelled -------------------------------------------------

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "jovyan:x:1000:100::/home/jovyan:/bin/sh\n"
    "toor:x:0:0::/root:/bin/sh\n"
    "odd:x:abc:0::/:/bin/sh\n"
)


@pytest.mark.parametrize(
    ("spec", "passwd", "uid"),
    [
        pytest.param("0", None, 0, id="0"),
        pytest.param("0000", None, 0, id="0000"),
        pytest.param("0:0", None, 0, id="0:0"),
        pytest.param("0:1000", None, 0, id="uid-0-with-a-group"),
        pytest.param("root", None, 0, id="root"),
        pytest.param("root:root", None, 0, id="root:root"),
        pytest.param("1000", None, 1000, id="1000"),
        pytest.param("1000:0", None, 1000, id="root-group-only"),
        pytest.param("01000:100", None, 1000, id="leading-zeros"),
        pytest.param("jovyan", None, None, id="a-name-needs-the-image"),
        pytest.param("jovyan:users", PASSWD, 1000, id="jovyan"),
        pytest.param("toor", PASSWD, 0, id="a-name-for-uid-0"),
        pytest.param("odd", PASSWD, 0, id="a-uid-field-runc-reads-as-0"),
    ],
)
def test_run_as_uid(spec: str, passwd: str | None, uid: int | None) -> None:
    assert run_as_uid(spec, passwd) == uid


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        pytest.param("+0", "is not of the form", id="plus"),
        pytest.param("-0", "is not of the form", id="minus"),
        pytest.param(" 0", "is not of the form", id="space"),
        pytest.param("", "is not of the form", id="empty"),
        pytest.param(":1000", "is not of the form", id="group-only"),
        pytest.param("1000:", "is not of the form", id="empty-group"),
        pytest.param("1000:100:1", "is not of the form", id="three-parts"),
        pytest.param("\u0660", "is not of the form", id="arabic-zero"),
        pytest.param("0_0", "is not of the form", id="underscore-number"),
        pytest.param("nobody", "has no user 'nobody'", id="unknown-name"),
    ],
)
def test_run_as_uid_refuses(spec: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        run_as_uid(spec, PASSWD)
