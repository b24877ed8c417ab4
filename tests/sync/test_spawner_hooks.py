"""DoLabSpawner's hook traits: the shipped hooks load, a bad one stops the hub at start with a sentence."""

from __future__ import annotations

import pytest
from traitlets import TraitError
from traitlets.config import Config

from dolab_services.sync.registration import FINAL_SYNC_HOOK, RESTORE_HOOK
from dolab_spawner import DoLabSpawner


def test_the_sync_hooks_load() -> None:
    c = Config()
    c.DoLabSpawner.pre_destroy_hooks = [FINAL_SYNC_HOOK]
    c.DoLabSpawner.pre_start_hooks = [RESTORE_HOOK]
    DoLabSpawner.check_config(c)


@pytest.mark.parametrize(
    "hook",
    [
        "dolab_services.sync.hooks:no_such_hook",
        "no_such_module:hook",
        "dolab_services.sync.hooks",
        "dolab_services.sync.hooks:log",
    ],
    ids=["missing-name", "missing-module", "no-callable", "not-callable"],
)
def test_a_bad_hook_is_refused_at_start(hook: str) -> None:
    c = Config()
    c.DoLabSpawner.pre_destroy_hooks = [hook]
    with pytest.raises(
        TraitError, match=r"DoLabSpawner.pre_destroy_hooks: hook .*(cannot import|has no callable|must be written)"
    ):
        DoLabSpawner.check_config(c)
