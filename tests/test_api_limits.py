"""What one client may take of the API: wrong provisioning proofs are throttled per address, event
streams are capped per token and in all, bodies are bounded."""

from __future__ import annotations

import asyncio
import time

import pytest

from provisioning.registry.tokens import Scope
from tests.api_support import api_settings, assert_problem, running_api
from tests.auth_support import eventually

FLEET_SECRET = "fleet-secret-for-api-tests-0123456789"
LOCKOUT_AFTER = 4


@pytest.mark.parametrize("auth", ["fleet_secret", "device_key"])
async def test_wrong_proofs_lock_the_address_out_with_429_and_retry_after(sqlite_url: str, auth: str) -> None:
    secret = {"fleet_secret": FLEET_SECRET} if auth == "fleet_secret" else {"device_key_secret": FLEET_SECRET}
    settings = api_settings(
        sqlite_url,
        provisioning={"auth": auth, **secret},
        auth={
            "throttle_after": 2,
            "lockout_after": LOCKOUT_AFTER,
            "lockout_seconds": 30,
            "max_refusal_delay": 0.1,
        },
    )
    async with running_api(settings) as api:
        # Concurrent guesses, each at another MAC: counted by address, not by MAC.
        guesses = [
            api.client.post(
                "/api/v1/provision", json={"mac": f"02:00:00:00:e0:{n:02x}"}, auth=("provision", f"guess-{n}")
            )
            for n in range(LOCKOUT_AFTER * 3)
        ]
        started = time.monotonic()
        answers = await asyncio.gather(*guesses)
        statuses = sorted(r.status_code for r in answers)
        # Exactly lockout_after guesses were checked; every later one refused unchecked.
        assert statuses == [401] * LOCKOUT_AFTER + [429] * (LOCKOUT_AFTER * 2)
        assert time.monotonic() - started < 5
        locked = next(r for r in answers if r.status_code == 429)
        assert_problem(locked, 429, "TOO_MANY_FAILURES")
        assert locked.headers["retry-after"] == "30"

        # The right proof from a locked address is refused too (else the lock is an oracle)...
        right = FLEET_SECRET if auth == "fleet_secret" else None
        if right is not None:
            response = await api.client.post(
                "/api/v1/provision", json={"mac": "02:00:00:00:e1:01"}, auth=("provision", right)
            )
            assert_problem(response, 429, "TOO_MANY_FAILURES")
        # ...but a back end's provision-scoped token is no guess, and is not locked out.
        token = await api.headers(Scope.PROVISION)
        by_token = await api.client.post(
            "/api/v1/provision", json={"mac": "02:00:00:00:e1:02"}, headers=token
        )
        assert by_token.status_code == 200, by_token.text


async def test_event_streams_are_capped_per_token_and_in_all(sqlite_url: str) -> None:
    settings = api_settings(sqlite_url, api={"max_streams": 3, "max_streams_per_token": 2})
    async with running_api(settings) as api:
        first, second = await api.headers(Scope.READ), await api.headers(Scope.READ)
        async with (
            api.client.stream("GET", "/api/v1/events/stream", headers=first) as a,
            api.client.stream("GET", "/api/v1/events/stream", headers=first) as b,
        ):
            assert (a.status_code, b.status_code) == (200, 200)
            third = await api.client.get("/api/v1/events/stream", headers=first)
            assert_problem(third, 429, "TOO_MANY_STREAMS")
            assert third.headers["retry-after"]
            async with api.client.stream("GET", "/api/v1/events/stream", headers=second) as c:
                assert c.status_code == 200
                assert_problem(
                    await api.client.get("/api/v1/events/stream", headers=second), 429, "TOO_MANY_STREAMS"
                )
        # Closed streams give their slots back (once the server has seen the client go).
        deadline = time.monotonic() + 5
        while True:
            async with api.client.stream("GET", "/api/v1/events/stream", headers=first) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "a closed stream kept its slot"
            await asyncio.sleep(0.05)


async def test_a_body_over_the_limit_is_refused_before_it_is_read(sqlite_url: str) -> None:
    settings = api_settings(sqlite_url, api={"max_body_bytes": 4096})
    async with running_api(settings) as api:
        headers = {**await api.headers(Scope.WRITE), "Content-Type": "text/csv"}
        body = "mac\n" + "02:00:00:00:00:01\n" * 1000
        response = await api.client.post("/api/v1/devices/import", content=body, headers=headers)
        assert_problem(response, 413, "PAYLOAD_TOO_LARGE")


async def test_a_stream_ends_when_the_server_stops(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url)) as api:
        headers = await api.headers(Scope.READ)
        async with api.client.stream("GET", "/api/v1/events/stream", headers=headers) as response:
            assert response.status_code == 200
            started = time.monotonic()
            await api.server.stop()
            await response.aread()  # returns once the server ends the stream
        assert time.monotonic() - started < 3


async def test_connections_past_the_limit_are_answered_503_and_the_rest_keep_working(
    sqlite_url: str,
) -> None:
    # One client holding idle connections open must not take the process's file descriptors
    # (shared with the MQTT listeners in serve): past [api] max_connections, 503.
    settings = api_settings(sqlite_url, api={"max_connections": 3})
    async with running_api(settings) as api:
        port = api.server.settings.api.port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        try:
            refused = await eventually(
                lambda: api.client.get("/health"), lambda answer: answer.status_code == 503
            )
            assert refused.status_code == 503
        finally:
            for _, writer in held:
                writer.close()
                await writer.wait_closed()
        again = await eventually(lambda: api.client.get("/health"), lambda answer: answer.status_code == 200)
        assert again.status_code == 200
