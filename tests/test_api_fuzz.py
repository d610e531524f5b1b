"""A property-based fuzz of the API from its own OpenAPI document (schemathesis): every generated
request, valid or not, gets a documented, schema-conformant answer and never a 5xx."""

from __future__ import annotations

import asyncio
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from provisioning.registry.tokens import Scope
from tests.api_support import api_settings, running_api

#: Generated requests per operation and mode (valid, then invalid): 20 operations, about 45 s.
EXAMPLES = 20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(document: dict[str, Any], base_url: str, headers: dict[str, str]) -> int:
    """Call every operation with generated requests and check each answer; how many were made."""
    schema = schemathesis.openapi.from_dict(document)
    calls = 0
    with requests.Session() as session:
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result  # an operation schemathesis cannot read
            operation = result.ok()
            for mode in ("positive", "negative"):
                strategy = operation.as_strategy(generation_mode=_mode(mode))

                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                    phases=[hypothesis.Phase.generate],
                )
                @given(strategy)
                def check(case: Any) -> None:
                    nonlocal calls
                    response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
                    calls += 1
                    case.validate_response(response, checks=CHECKS)

                try:
                    check()
                except hypothesis.errors.Unsatisfiable:
                    # Nothing to make invalid (no parameters, no body): the positive run covers it.
                    assert mode == "negative", operation
    return calls


def _mode(name: str) -> Any:
    from schemathesis import GenerationMode  # noqa: PLC0415

    return GenerationMode(name)


async def test_generated_requests_get_documented_answers_and_no_5xx(sqlite_url: str) -> None:
    # The open policy and a generous rate limit: generated devices are provisioned, not refused.
    options = {"address_burst": 10_000, "mac_burst": 100}
    # An event stream ends after stream_seconds: a short one, so each generated call returns.
    settings = api_settings(
        sqlite_url, provisioning=options, api={"stream_seconds": 0.2, "max_streams": 1000}
    )
    async with running_api(settings) as api:
        document = (await api.client.get("/openapi.json")).json()
        headers = await api.headers(*Scope)
        calls = await asyncio.to_thread(fuzz, document, api.server.url, headers)
    assert calls >= 20 * EXAMPLES
