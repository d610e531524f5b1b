"""Hostile provisioning payloads: what a firmware dump reader or a broken device could publish.

- thousands of generated payloads straight through :class:`ProvisioningService` (no sockets);
- a few hundred of the same kind through a real broker session;
- the kept corpus ``tests/corpus/payloads/`` replayed over MQTT, then a working round trip.

Every payload gets exactly one reply; only a valid request changes the registry, and only a
valid request gets ``ok``; nothing is answered ``INTERNAL``; an error reply stays small whatever
it answers. Group and all-zero MACs are refused as ``INVALID_MAC`` (see ``parse_device_mac``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.embedded import BrokerServer
from provisioning.contract import identity_from_client_id, reply_topic
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.migrate import upgrade
from provisioning.service import ProvisioningService
from tests.mqtt_clients import (
    ACCEPTED,
    REPLY_PREFIX,
    WAIT,
    assert_error,
    device_count,
    enrol,
    login,
    provision,
    provisioning_broker,
    provisioning_session,
    provisioning_settings,
)
from tests.test_provisioning import (
    PROPERTY_MAX_BYTES,
    REQUEST_ERRORS,
    attempts,
    expected_valid,
    json_values,
    written_mac,
)

#: The issue asks for at least 2,000 generated payloads per run.
SERVICE_EXAMPLES = 2000
BROKER_EXAMPLES = 300
CORPUS = Path(__file__).parent / "corpus" / "payloads"
CORPUS_MAC = "02:c0:ff:ee:00:01"
#: An error reply names a code and one bounded line: it never reflects the payload back in bulk.
MAX_ERROR_REPLY = 512
GROUP_AND_ZERO_MACS = [
    "ff:ff:ff:ff:ff:ff",
    "FF-FF-FF-FF-FF-FF",
    "00:00:00:00:00:00",
    "0000.0000.0000",
    "01:00:5e:00:00:fb",
    "33:33:00:00:00:01",
    "01:80:c2:00:00:00",
    "ab:cd:ef:01:23:45",
]
# Byte sequences no UTF-8 decoder may accept: a stray continuation byte, an overlong '/', an
# encoded surrogate, a code point past U+10FFFF, a truncated sequence, bytes never used in UTF-8.
INVALID_UTF8 = [b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xff", b"\xfe"]
# JSON escapes that decode to something no registry may store or reply with.
NASTY_ESCAPES = ["\\u0000", "\\ud800", "\\udfff", "\\u001b[2J", "\\u007f", "\\ud83d"]


def any_mac_bytes() -> st.SearchStrategy[bytes]:
    """Six bytes, with group, all-zero and broadcast addresses much likelier than by chance."""
    return st.binary(min_size=6, max_size=6) | st.sampled_from(
        [b"\x00" * 6, b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01"]
    )


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(client id, MAC part of it, payload) for the cases ``attempts`` does not reach."""
    raw = draw(any_mac_bytes())
    head = written_mac(raw, draw(st.integers(0, 3)), draw(st.booleans()))
    own = written_mac(raw, draw(st.integers(0, 3)), draw(st.booleans()))
    kind = draw(st.sampled_from(["json", "deep", "bad-utf8", "escape", "special", "duplicate", "near-limit"]))
    if kind == "json":  # any JSON document at all, not only objects
        return head, head, json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
        nested = opener * depth + "0" + closer * depth
        where = draw(st.sampled_from(["top", "sensor_types", "extra", "mac"]))
        text = nested if where == "top" else f'{{"mac": "{own}", "{where}": {nested}}}'
        return head, head, text.encode()
    if kind == "bad-utf8":
        body = json.dumps({"mac": own, "firmware_version": "1.0"}).encode()
        at = draw(st.integers(0, len(body)))
        return head, head, body[:at] + draw(st.sampled_from(INVALID_UTF8)) + body[at:]
    if kind == "escape":
        target = draw(st.sampled_from(["mac", "firmware_version", "sensor", "request_id"]))
        escape = draw(st.sampled_from(NASTY_ESCAPES))
        value = f'"{own}{escape}"' if target == "mac" else f'"v{escape}"'
        if target == "sensor":
            return head, head, f'{{"mac": "{own}", "sensor_types": [{value}]}}'.encode()
        extra = "" if target == "mac" else f', "{target}": {value}'
        mac = value if target == "mac" else f'"{own}"'
        return head, head, f'{{"mac": {mac}{extra}}}'.encode()
    if kind == "special":  # a group or all-zero MAC asking for itself
        return own, own, json.dumps({"mac": own}).encode()
    if kind == "duplicate":  # duplicate keys: the last one wins in every JSON parser we use
        other = written_mac(draw(any_mac_bytes()), 0, upper=False)
        first, last = draw(st.permutations([own, other]))
        return head, head, f'{{"mac": "{first}", "mac": "{last}"}}'.encode()
    base = json.dumps({"mac": own, "pad": ""}).encode()
    size = PROPERTY_MAX_BYTES - len(base) + draw(st.integers(-2, 2))
    return head, head, json.dumps({"mac": own, "pad": "p" * max(0, size)}).encode()


payloads = attempts() | hostile()


def contract_valid(payload: bytes, session_mac: str) -> bool | None:
    """The contract's verdict (see ``expected_valid``), knowing text must be valid Unicode."""
    verdict = expected_valid(payload, session_mac)
    if verdict is False:
        return False
    data = json.loads(payload)
    texts = [data.get("mac"), data.get("firmware_version"), data.get("request_id")]
    texts += data.get("sensor_types") or []
    for text in texts:
        if isinstance(text, str) and not _is_unicode(text):
            return False
    return verdict


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Ledger:
    """What the run has seen: MACs enrolled, replies by status or code."""

    enrolled: set[str] = field(default_factory=set)
    seen: dict[str, int] = field(default_factory=dict)

    def check(
        self, *, session_mac: str, own_topic: str, payload: bytes, topic: str, reply: bytes, grew: int
    ) -> dict[str, Any]:
        """Assert one exchange kept the contract; returns the reply's JSON object."""
        body = json.loads(reply.decode("utf-8"))  # strict UTF-8: a reply is always valid text
        assert isinstance(body, dict), body
        valid = contract_valid(payload, session_mac)
        if body["status"] == "ok":
            assert valid is not False, f"ok for an invalid request {payload!r}"
            assert session_mac not in self.enrolled
            assert grew == 1
            assert topic == REPLY_PREFIX + json.loads(payload)["mac"]
            self.enrolled.add(session_mac)
            self.seen["ok"] = self.seen.get("ok", 0) + 1
            return body
        assert body["status"] == "error", body
        assert len(reply) <= MAX_ERROR_REPLY, f"{len(reply)}-byte error reply to {payload[:80]!r}"
        assert grew == 0, f"registry changed on a refusal: {body}"
        code = body["error_code"]
        self.seen[code] = self.seen.get(code, 0) + 1
        if valid is True:  # only a MAC enrolled earlier in this run is refused
            assert session_mac in self.enrolled, f"valid request {payload!r} refused: {body}"
            assert code == "RATE_LIMITED", body
        elif valid is False:
            assert code in REQUEST_ERRORS, body
            assert topic == own_topic
        else:
            assert code in REQUEST_ERRORS | {"RATE_LIMITED"}, body
        return body


#: Limits out of the way, so every verdict is the contract's; a MAC seen once stays refused.
PROPERTY_OPTIONS: dict[str, Any] = {
    "max_payload_bytes": PROPERTY_MAX_BYTES,
    "reissue_cooldown": 3600,
    "mac_burst": 10_000,
    "address_burst": 100_000,
}


@contextmanager
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail if anything was logged at ERROR (INTERNAL replies and hook failures are)."""
    caplog.set_level(logging.INFO)
    yield
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# -- thousands, straight through the service ----------------------------------------------------------


@pytest.mark.slow
def test_two_thousand_generated_payloads_through_the_service(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger()
    with asyncio.Runner() as runner, no_errors_logged(caplog):
        engine = create_engine(sqlite_url)
        runner.run(upgrade(engine))
        registry = DeviceRegistry(engine)
        hasher = PasswordHasher(4, workers=1)

        async def make_service() -> ProvisioningService:
            return ProvisioningService(
                registry, hasher, provisioning_settings(sqlite_url, **PROPERTY_OPTIONS)
            )

        service = runner.run(make_service())

        async def count() -> int:
            return (await registry.list_devices(limit=1)).total

        total = [0]

        @settings(max_examples=SERVICE_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(payloads)
        def through_the_service(attempt: tuple[str, str, bytes]) -> None:
            client_id, head, payload = attempt
            identity = identity_from_client_id(client_id)
            assert identity is not None
            # Only handle() writes devices here: the count after one example is the next one's before.
            outcome = runner.run(service.handle(identity, payload, "192.0.2.1"))
            after = runner.run(count())
            grew, total[0] = after - total[0], after
            body = ledger.check(
                session_mac=identity.mac,
                own_topic=reply_topic(head),
                payload=payload,
                topic=outcome.topic,
                reply=outcome.reply.to_payload(),
                grew=grew,
            )
            if body["status"] == "ok":  # the stored hash is of the password the device got
                record = runner.run(registry.find_credentials_by_mac(identity.mac))
                assert record is not None
                assert record.password_hash is not None
                assert bcrypt.checkpw(body["mqtt_password"].encode(), record.password_hash.encode())

        try:
            through_the_service()
            assert runner.run(count()) == len(ledger.enrolled)
        finally:
            hasher.close()
            runner.run(registry.close())
    examples = sum(ledger.seen.values())
    print(f"service: {examples} payloads: {sorted(ledger.seen.items())}")
    assert examples >= SERVICE_EXAMPLES
    # The mix reached every branch worth reaching: enrolments and each kind of refusal.
    assert {"ok", "INVALID_PAYLOAD", "INVALID_MAC", "MAC_MISMATCH", "PAYLOAD_TOO_LARGE"} <= set(ledger.seen)


# -- hundreds, through a real broker ------------------------------------------------------------------


@pytest.mark.slow
async def test_generated_payloads_through_a_real_broker(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger()
    with no_errors_logged(caplog):
        async with provisioning_broker(sqlite_url, **PROPERTY_OPTIONS) as server:
            port = server.settings.broker.port
            loop = asyncio.get_running_loop()
            checked = threading.Event()

            def count() -> int:
                return asyncio.run_coroutine_threadsafe(device_count(server), loop).result(WAIT)

            @settings(max_examples=BROKER_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
            @given(payloads)
            def over_mqtt(attempt: tuple[str, str, bytes]) -> None:
                client_id, head, payload = attempt
                own_topic = REPLY_PREFIX + head
                before = count()
                with provisioning_session(port, client_id, own_topic) as session:
                    reply = session.request(payload)
                assert reply is not None, f"no reply to {payload!r}"
                assert not reply.retain
                identity = identity_from_client_id(client_id)
                assert identity is not None
                ledger.check(
                    session_mac=identity.mac,
                    own_topic=own_topic,
                    payload=payload,
                    topic=reply.topic,
                    reply=reply.payload,
                    grew=count() - before,
                )
                checked.set()

            await asyncio.to_thread(over_mqtt)
            assert checked.is_set()
            assert await device_count(server) == len(ledger.enrolled)
            assert await roundtrip(server, "02:c0:ff:ee:ff:01")
    print(f"broker: {sum(ledger.seen.values())} payloads: {sorted(ledger.seen.items())}")
    assert sum(ledger.seen.values()) >= BROKER_EXAMPLES


async def roundtrip(server: BrokerServer, mac: str) -> bool:
    """The broker still serves: a fresh MAC enrols and logs in with what it got."""
    creds = await enrol(server, mac)
    return await asyncio.to_thread(login, server.settings.broker.port, creds) == ACCEPTED


# -- the kept corpus ----------------------------------------------------------------------------------


def corpus() -> list[Path]:
    """Every kept case, in a stable order."""
    return sorted(CORPUS.glob("*--*.bin"))


def test_the_corpus_is_there_and_named_by_expected_code() -> None:
    cases = corpus()
    assert len(cases) >= 50
    codes = {case.name.split("--", 1)[0] for case in cases}
    assert codes == {"INVALID_PAYLOAD", "INVALID_MAC", "MAC_MISMATCH", "PAYLOAD_TOO_LARGE"}


@pytest.mark.slow
async def test_every_corpus_case_is_refused_with_its_code_and_the_broker_keeps_serving(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cases = corpus()
    with no_errors_logged(caplog):
        async with provisioning_broker(sqlite_url) as server:
            port = server.settings.broker.port

            def replay() -> list[tuple[str, Any]]:
                with provisioning_session(port, CORPUS_MAC) as session:
                    return [(case.name, session.request(case.read_bytes())) for case in cases]

            answers = await asyncio.to_thread(replay)
            assert await device_count(server) == 0
            assert await roundtrip(server, "02:c0:ff:ee:ff:02")
    for name, reply in answers:
        code = name.split("--", 1)[0]
        body = assert_error(reply, code, topic=REPLY_PREFIX + CORPUS_MAC)
        assert len(reply.payload) <= MAX_ERROR_REPLY, name
        assert "request_id" not in body, name


@pytest.mark.slow
@pytest.mark.parametrize("mac", GROUP_AND_ZERO_MACS)
async def test_a_group_or_all_zero_mac_asking_for_itself_gets_invalid_mac(
    database_url: str, mac: str
) -> None:
    async with provisioning_broker(database_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, mac, {"mac": mac, "request_id": "group"})
        body = assert_error(reply, "INVALID_MAC", topic=REPLY_PREFIX + mac)
        assert body["request_id"] == "group"
        assert "not a device's address" in body["detail"]
        assert await device_count(server) == 0


@pytest.mark.slow
@pytest.mark.parametrize("mac", ["ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "01:00:5e:00:00:fb"])
async def test_an_operator_cannot_add_a_group_or_all_zero_mac(registry: DeviceRegistry, mac: str) -> None:
    from provisioning import InvalidMacError  # noqa: PLC0415 - only this test needs it

    with pytest.raises(InvalidMacError, match="not a device's address"):
        await registry.add_allowed(mac)
    assert (await registry.list_devices()).total == 0
