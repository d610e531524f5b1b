"""The console in a real browser: Debian's chromium driven by Playwright (no browser download),
against ``serve`` with the API and the console, devices on MQTT.

With ``MQTTPROV_TEST_SCREENSHOTS=docs/console`` set, the tests write the screenshots docs/console.md shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from sqlalchemy import update

from broker.http.api.hosted import BrokerWithApi
from provisioning.client import Credentials, provision
from provisioning.registry.models import OperatorSession, utcnow
from provisioning.registry.operators import IDLE
from tests.api_support import api_settings
from tests.console_support import OPERATOR, PASSWORD, add_operator
from tests.mqtt_clients import ACCEPTED, device_session, enrol, login

# slow, the whole file: a browser and a broker per test (about 30 s in all).
pytestmark = pytest.mark.slow

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = os.environ.get("MQTTPROV_TEST_SCREENSHOTS")


def chromium() -> str | None:
    """The system's chromium: $MQTTPROV_CHROMIUM, else chromium on PATH (.ci/run installs it)."""
    return os.environ.get("MQTTPROV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def executable() -> str:
    found = chromium()
    if found is None:
        reason = "no chromium on this machine (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("MQTTPROV_TEST_REQUIRE_BROWSER"):  # .ci/run: a missing browser is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture
async def browser(executable: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def served(sqlite_url: str) -> AsyncIterator[BrokerWithApi]:
    settings = api_settings(
        sqlite_url, api={"enabled": True}, provisioning={"mode": "approval", "pending_retry_after": 1}
    )
    async with BrokerWithApi(settings) as running:
        await add_operator(running.api.app.state.services)
        yield running


async def logged_in_page(browser: Browser, served: BrokerWithApi, *, width: int = 1280) -> Page:
    context = await browser.new_context(base_url=served.api.url, viewport={"width": width, "height": 900})
    page = await context.new_page()
    await page.goto("/")
    await expect(page).to_have_url(served.api.url + "/login?next=%2F")
    await shot(page, "login")
    await page.get_by_label("Operator").fill(OPERATOR)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.keyboard.press("Enter")  # keyboard only
    await expect(page.get_by_role("heading", name="Fleet overview")).to_be_visible()
    return page


async def shot(page: Page, name: str) -> None:
    """Save the page as docs/console/NAME.png when screenshots are asked for."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


async def test_an_operator_logs_in_and_every_page_renders(browser: Browser, served: BrokerWithApi) -> None:
    registry = served.broker.registry
    for index in range(4):
        device = await registry.add_allowed(f"02:00:00:00:b0:0{index}", note=f"line {index}")
        await registry.set_labels(device.id, {"site": "berlin" if index % 2 else "lyon"})
        if index % 2 == 0:
            await enrol(served.broker, device.mac)  # a bar in the overview's chart
    page = await logged_in_page(browser, served)
    await shot(page, "overview")
    await page.get_by_role("link", name="Devices", exact=True).click()
    await expect(page.locator("#device-total")).to_have_text("4 devices, 1-4 shown")
    await expect(page.locator('tr[data-mac="02:00:00:00:b0:00"] .badge')).to_have_text("registered")
    await shot(page, "devices")
    await page.get_by_role("link", name="02:00:00:00:b0:01").click()
    await expect(page.get_by_role("heading", name="02:00:00:00:b0:01")).to_be_visible()
    await shot(page, "device")
    for link, title, name in (
        ("Approvals", "Approval queue", "approvals"),
        ("Service accounts", "Service accounts", "accounts"),
        ("API tokens", "API tokens", "tokens"),
    ):
        await page.get_by_role("link", name=link, exact=True).click()
        await expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible()
        await shot(page, name)
    narrow = await logged_in_page(browser, served, width=390)
    await narrow.goto("/devices")
    # Readable at 390 px: the page itself does not scroll sideways (wide tables scroll in place).
    assert await narrow.evaluate("document.documentElement.scrollWidth") <= 390
    await shot(narrow, "devices-390px")


async def test_a_waiting_device_is_approved_in_the_console_and_gets_its_credentials(
    browser: Browser, served: BrokerWithApi
) -> None:
    mac = "02:00:00:00:a1:01"
    page = await logged_in_page(browser, served)
    await page.get_by_role("link", name="Approvals", exact=True).click()
    await expect(page.locator("#pending-total")).to_have_text("0 waiting")
    asked = threading.Event()
    address = served.broker.settings.broker
    enrolling = asyncio.create_task(
        asyncio.to_thread(
            provision, address.host, address.port, mac, timeout=5.0, on_retry=lambda _r, _p: asked.set()
        )
    )
    # The request appears by itself (the rows are polled), and is approved by its own button.
    row_button = page.get_by_role("button", name=f"approve {mac}")
    await expect(row_button).to_be_visible(timeout=5000)
    await shot(page, "approvals-waiting")
    await row_button.click()
    await expect(page.get_by_role("status")).to_have_text("1 approved.")
    credentials: Credentials = await asyncio.wait_for(enrolling, 15.0)
    assert asked.is_set()
    creds = {
        "mqtt_client_id": credentials.mqtt_client_id,
        "mqtt_username": credentials.mqtt_username,
        "mqtt_password": credentials.mqtt_password,
    }
    assert await asyncio.to_thread(login, address.port, creds) == ACCEPTED


async def test_a_device_decommissioned_in_the_console_goes_offline_and_the_list_shows_it(
    browser: Browser, served: BrokerWithApi
) -> None:
    mac = "02:00:00:00:a2:01"
    await served.broker.registry.add_allowed(mac)  # approval mode: approved ahead, it enrols at once
    creds = await enrol(served.broker, mac)
    port = served.broker.settings.broker.port
    session = await asyncio.to_thread(device_session, port, creds)
    try:
        page = await logged_in_page(browser, served)
        watching = await page.context.new_page()
        await watching.goto("/devices?q=" + mac)
        row = watching.locator(f'tr[data-mac="{mac}"] .badge')
        await expect(row).to_have_text("online", timeout=5000)  # presence, live

        await page.goto("/devices?q=" + mac)
        await page.get_by_role("link", name=mac).click()
        await page.get_by_label("Type its MAC to confirm").fill(mac.upper().replace(":", "-"))
        await page.get_by_role("button", name="Decommission").click()
        thrown_off = await asyncio.to_thread(session.disconnected.wait, 2.0)
        await expect(page.locator("#device-status")).to_have_text("decommissioned")
        await expect(row).to_have_text("decommissioned", timeout=2000)  # the other tab, without a reload
    finally:
        await asyncio.to_thread(session.close)
    assert thrown_off, "the device was not disconnected within 2 s of the decommission"


@pytest.mark.parametrize("typed", ["02-00-00-00-A3", "0200.0000.a3", "020000"])
async def test_search_by_a_mac_in_any_notation(browser: Browser, served: BrokerWithApi, typed: str) -> None:
    for mac in ("02:00:00:00:a3:01", "02:00:00:00:a3:02", "06:00:00:00:a3:03"):
        await served.broker.registry.add_allowed(mac)
    page = await logged_in_page(browser, served)
    await page.get_by_role("link", name="Devices", exact=True).click()
    await page.get_by_label("MAC, id or username").fill(typed)
    await page.keyboard.press("Enter")
    await expect(page.locator("#device-total")).to_have_text("2 devices, 1-2 shown")
    await expect(page.locator('tr[data-mac="06:00:00:00:a3:03"]')).to_have_count(0)


async def test_an_expired_session_returns_to_the_login_page(browser: Browser, served: BrokerWithApi) -> None:
    page = await logged_in_page(browser, served)
    await page.get_by_role("link", name="Devices", exact=True).click()
    async with served.broker.registry.engine.begin() as conn:
        stale = utcnow() - IDLE - timedelta(seconds=1)
        await conn.execute(update(OperatorSession).values(last_seen_at=stale))
    # The polled rows find the session gone: the page goes to the login page by itself.
    await expect(page).to_have_url(served.api.url + "/login?next=%2Fdevices", timeout=5000)
    await page.get_by_label("Operator").fill(OPERATOR)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Devices", exact=True)).to_be_visible()
