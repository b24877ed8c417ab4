"""ServerTokens: tokens minted for one server, owned by its user, reused, re-minted when refused, revoked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dolab_services.hubclient import HubAPIError, HubClient
from dolab_services.servertokens import ServerTokens, revoke_quietly, server_scope
from tests.hub_double import HubDouble, serve_hub_double


class TokenHub:
    """A hub double that mints numbered tokens and records revocations."""

    def __init__(self, hub: HubDouble) -> None:
        self.hub = hub
        self.minted: list[tuple[str, dict[str, Any]]] = []
        self.revoked: list[str] = []
        self.refuse = False
        hub.respond = self.answer

    def answer(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        parts = path.split("/")
        if method == "POST" and path.endswith("/tokens"):
            if self.refuse:
                return 403, {"status": 403, "message": "Forbidden"}
            self.minted.append((parts[4], body))
            number = len(self.minted)
            return 201, {"token": f"tok{number}", "id": f"a{number}"}
        if method == "DELETE" and "/tokens/" in path:
            self.revoked.append(f"{parts[4]}:{parts[6]}")
            return 204, None
        return 404, {"status": 404, "message": "Not found"}


@pytest.fixture
def hub() -> Iterator[TokenHub]:
    with serve_hub_double() as double:
        yield TokenHub(double)


def test_server_scope_names_one_server() -> None:
    assert server_scope("alice", "") == "access:servers!server=alice/"
    assert server_scope("alice", "gpu-1") == "access:servers!server=alice/gpu-1"


async def test_a_token_is_owned_by_the_user_limited_to_the_server_and_reused(hub: TokenHub) -> None:
    async with HubClient(hub.hub.api_url, "service-token") as client:
        tokens = ServerTokens(client, "dolab-test: reads kernels", lifetime_seconds=600)
        first = await tokens.get("alice", "gpu-1")
        assert await tokens.get("alice", "gpu-1") == first  # cached
        other = await tokens.get("bob", "")
    assert (first, other) == ("tok1", "tok2")
    (owner, body), (owner2, body2) = hub.minted
    assert owner == "alice" and body["scopes"] == ["access:servers!server=alice/gpu-1"]
    assert owner2 == "bob" and body2["scopes"] == ["access:servers!server=bob/"]
    assert body["expires_in"] == 600 and "dolab-test" in body["note"]


async def test_a_refused_token_is_revoked_and_replaced(hub: TokenHub) -> None:
    async with HubClient(hub.hub.api_url, "service-token") as client:
        tokens = ServerTokens(client, "test")
        first = await tokens.get("alice", "")
        await tokens.refused("alice", "", "not-the-current-one")  # an old token: nothing happens
        assert hub.revoked == []
        await tokens.refused("alice", "", first)
        assert hub.revoked == ["alice:a1"]
        assert await tokens.get("alice", "") == "tok2"


async def test_a_token_too_close_to_its_end_is_renewed(hub: TokenHub) -> None:
    async with HubClient(hub.hub.api_url, "service-token") as client:
        tokens = ServerTokens(client, "test", lifetime_seconds=600)
        await tokens.get("alice", "")
        # A backup that may run 20 minutes needs more than a 10-minute token has: asking caps at its lifetime.
        assert await tokens.get("alice", "", valid_for_seconds=530) == "tok1"
        tokens._tokens[("alice", "")].expires -= 100
        assert await tokens.get("alice", "", valid_for_seconds=530) == "tok2"
    assert hub.revoked == ["alice:a1"]


async def test_prune_revokes_tokens_of_servers_gone(hub: TokenHub) -> None:
    async with HubClient(hub.hub.api_url, "service-token") as client:
        tokens = ServerTokens(client, "test")
        await tokens.get("alice", "")
        await tokens.get("bob", "")
        await tokens.prune({("bob", "")})
        assert hub.revoked == ["alice:a1"] and len(tokens) == 1
        await revoke_quietly(tokens)
    assert hub.revoked == ["alice:a1", "bob:a2"] and len(tokens) == 0


async def test_a_hub_that_refuses_to_mint_is_an_error(hub: TokenHub) -> None:
    hub.refuse = True
    async with HubClient(hub.hub.api_url, "service-token") as client:
        with pytest.raises(HubAPIError) as caught:
            await ServerTokens(client, "test").get("alice", "")
    assert caught.value.status == 403


def test_lifetime_is_bounded() -> None:
    with pytest.raises(ValueError, match="at least 120 seconds"):
        ServerTokens(HubClient("http://127.0.0.1:1/hub/api", "t"), "test", lifetime_seconds=10)
