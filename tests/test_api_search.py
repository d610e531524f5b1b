"""Labels, search, export and import through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from provisioning.registry.tokens import Scope
from provisioning.registry.transfer import EXPORT_COLUMNS
from tests.api_support import Api, api_settings, assert_problem, running_api

READ_WRITE = (Scope.READ, Scope.WRITE)


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(database_url)) as running:
        yield running


async def _add(api: Api, headers: dict[str, str], mac: str, **labels: str) -> dict[str, Any]:
    response = await api.client.post("/api/v1/devices", json={"mac": mac, "labels": labels}, headers=headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _macs(api: Api, headers: dict[str, str], query: str) -> list[str]:
    response = await api.client.get("/api/v1/devices?" + query, headers=headers)
    assert response.status_code == 200, response.text
    return [d["mac"] for d in response.json()["devices"]]


async def test_labels_are_set_merged_replaced_and_removed(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    device = await _add(api, headers, "02:00:00:00:b0:01", site="berlin")
    path = f"/api/v1/devices/{device['id']}/labels"

    merged = await api.client.put(path, json={"labels": {"line": "2", "site": "paris"}}, headers=headers)
    assert merged.status_code == 200, merged.text
    assert merged.json()["labels"] == {"line": "2", "site": "paris"}
    replaced = await api.client.put(path, json={"labels": {"rack": "r:12"}, "replace": True}, headers=headers)
    assert replaced.json()["labels"] == {"rack": "r:12"}
    removed = await api.client.delete(path + "/rack", headers=headers)
    assert removed.status_code == 200
    assert removed.json()["labels"] == {}
    # Removing a label the device does not carry changes nothing; a key no device could carry is a 422.
    assert (await api.client.delete(path + "/rack", headers=headers)).status_code == 200
    assert_problem(await api.client.delete(path + "/Bad%20Key", headers=headers), 422, "INVALID_LABEL")
    bad = await api.client.put(path, json={"labels": {"site": "two words"}}, headers=headers)
    assert_problem(bad, 422, "INVALID_REQUEST")
    gone = await api.client.put(
        "/api/v1/devices/02:00:00:00:b0:99/labels", json={"labels": {}}, headers=headers
    )
    assert_problem(gone, 404, "NOT_FOUND")

    shown = await api.client.get(f"/api/v1/devices/{device['id']}/events?limit=10", headers=headers)
    assert [e["kind"] for e in shown.json()["events"]][:3] == ["labelled", "labelled", "labelled"]


async def test_every_filter_of_the_list(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    await _add(api, headers, "02:00:00:00:b1:01", site="berlin", line="1")
    await _add(api, headers, "02:00:00:00:b1:02", site="berlin", line="2")
    await _add(api, headers, "02:00:00:00:b2:03", site="paris", line="1")
    third = await api.client.get("/api/v1/devices?q=02-00-00-00-b2", headers=headers)
    pending = third.json()["devices"][0]
    await api.client.post(f"/api/v1/devices/{pending['id']}/reject", headers=headers)

    assert await _macs(api, headers, "label=site=berlin") == ["02:00:00:00:b1:01", "02:00:00:00:b1:02"]
    assert await _macs(api, headers, "label=site=berlin&label=line=2") == ["02:00:00:00:b1:02"]
    # A MAC prefix in any notation, an id prefix, a username prefix.
    assert await _macs(api, headers, "q=0200.0000.b1") == ["02:00:00:00:b1:01", "02:00:00:00:b1:02"]
    assert await _macs(api, headers, "q=" + pending["id"][:8]) == ["02:00:00:00:b2:03"]
    assert await _macs(api, headers, "q=" + pending["mqtt_username"]) == ["02:00:00:00:b2:03"]
    assert await _macs(api, headers, "status=rejected&status=pending") == ["02:00:00:00:b2:03"]
    assert len(await _macs(api, headers, "status=approved")) == 2
    assert await _macs(api, headers, "created_from=2000-01-01&created_until=2000-01-02") == []
    assert len(await _macs(api, headers, "created_from=2000-01-01T00:00:00Z")) == 3
    assert await _macs(api, headers, "seen_from=2000-01-01") == []  # none has logged in

    assert_problem(await api.client.get("/api/v1/devices?label=site", headers=headers), 422, "INVALID_LABEL")
    assert_problem(await api.client.get("/api/v1/devices?q=%20", headers=headers), 422, "INVALID_REQUEST")
    assert_problem(
        await api.client.get("/api/v1/devices?limit=1001", headers=headers), 422, "INVALID_REQUEST"
    )
    assert_problem(await api.client.get("/api/v1/devices?after=zz", headers=headers), 422, "INVALID_FILTER")


async def test_pages_by_offset_and_by_cursor_agree_with_an_exact_total(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    for n in range(7):
        await _add(api, headers, f"02:00:00:00:b3:{n:02x}", batch="b3")
    by_offset = [await _macs(api, headers, f"label=batch=b3&limit=3&offset={o}") for o in (0, 3, 6)]
    pages, after = [], ""
    while True:
        response = await api.client.get(f"/api/v1/devices?label=batch=b3&limit=3{after}", headers=headers)
        body = response.json()
        assert body["total"] == 7
        pages.append([d["mac"] for d in body["devices"]])
        if body["next_cursor"] is None:
            break
        after = "&after=" + body["next_cursor"]
    assert pages == by_offset
    assert [mac for page in pages for mac in page] == [f"02:00:00:00:b3:{n:02x}" for n in range(7)]


async def test_export_streams_what_import_reads_back(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    for n in range(5):
        await _add(api, headers, f"02:00:00:00:b4:{n:02x}", site="berlin" if n % 2 else "paris", n=str(n))

    async with api.client.stream(
        "GET", "/api/v1/devices/export?label=site=berlin", headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        exported = "".join([chunk async for chunk in response.aiter_text()])
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert list(rows[0]) == EXPORT_COLUMNS
    assert [r["mac"] for r in rows] == ["02:00:00:00:b4:01", "02:00:00:00:b4:03"]
    assert rows[0]["labels"] == "n=1;site=berlin"

    jsonl = await api.client.get("/api/v1/devices/export?format=jsonl&status=approved", headers=headers)
    assert jsonl.headers["content-type"] == "application/x-ndjson"
    devices = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [d["labels"]["n"] for d in devices] == ["0", "1", "2", "3", "4"]
    empty = await api.client.get("/api/v1/devices/export?q=ff:ff", headers=headers)
    assert empty.text.splitlines() == [",".join(EXPORT_COLUMNS)]

    # Deleted, then imported from the export: the same devices and labels again.
    for row in rows:
        assert (await api.client.delete(f"/api/v1/devices/{row['id']}", headers=headers)).status_code == 200
    csv_headers = {**headers, "Content-Type": "text/csv"}
    imported = await api.client.post("/api/v1/devices/import", content=exported, headers=csv_headers)
    assert imported.json() == {"imported": 2, "errors": []}
    again = await api.client.get("/api/v1/devices/export?format=jsonl&label=site=berlin", headers=headers)
    copied = [json.loads(line) for line in again.text.splitlines()]
    assert [(d["mac"], d["labels"]) for d in copied] == [
        (d["mac"], d["labels"]) for d in devices if d["labels"]["site"] == "berlin"
    ]


async def test_import_reports_each_bad_line_and_imports_the_rest(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    await _add(api, headers, "02:00:00:00:b5:01")
    body = (
        "MAC,firmware,note,labels\n"
        "02:00:00:00:b5:02,1.0,,site=berlin;line=1\n"
        "not-a-mac,,,\n"
        "02:00:00:00:b5:01,,,\n"
        "02-00-00-00-b5-02,,,\n"
        "02:00:00:00:b5:03,,,site=two words\n"
        "02:00:00:00:b5:04,,," + "\n"
    )
    csv_headers = {**headers, "Content-Type": "text/csv"}
    report = await api.client.post("/api/v1/devices/import", content=body, headers=csv_headers)
    assert report.status_code == 200, report.text
    assert report.json()["imported"] == 2
    assert [(e["line"], e["error"]) for e in report.json()["errors"]] == [
        (3, "invalid MAC"),
        (4, "already registered"),
        (5, "duplicate in file"),
        (6, "invalid label value 'two words': 1-63 letters, digits, '.', '_', '-', ':' or '/'"),
    ]
    as_json = [{"mac": "02:00:00:00:b5:05", "labels": {"site": "x"}}, {"mac": 5}, "nothing"]
    report = await api.client.post("/api/v1/devices/import", json=as_json, headers=headers)
    assert report.json() == {
        "imported": 1,
        "errors": [
            {"line": 2, "mac": "", "error": "invalid MAC"},
            {"line": 3, "mac": "", "error": "invalid MAC"},
        ],
    }
    assert await _macs(api, headers, "label=site=x") == ["02:00:00:00:b5:05"]

    no_mac = await api.client.post("/api/v1/devices/import", content="firmware\n1\n", headers=csv_headers)
    assert_problem(no_mac, 422, "INVALID_IMPORT")
    latin1 = await api.client.post("/api/v1/devices/import", content=b"mac\n\xff\n", headers=csv_headers)
    assert_problem(latin1, 422, "INVALID_IMPORT")
    text = await api.client.post("/api/v1/devices/import", content="mac", headers=headers)
    assert_problem(text, 415, "UNSUPPORTED_MEDIA_TYPE")
    many = "mac\n" + "".join(
        f"02:00:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}\n" for n in range(10_001)
    )
    assert_problem(
        await api.client.post("/api/v1/devices/import", content=many, headers=csv_headers),
        422,
        "INVALID_IMPORT",
    )
