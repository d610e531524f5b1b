"""Pages and fragments from the templates, with what every page shows (operator, token, notices)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse

from broker.http.console.state import console_of
from provisioning.registry.fleet import Enrolments
from provisioning.registry.operators import ConsoleSession


def page(
    request: Request,
    template: str,
    session: ConsoleSession | None,
    *,
    status: int = 200,
    error: str | None = None,
    notice: str | None = None,
    **context: Any,
) -> HTMLResponse:
    """``template`` rendered for ``session``'s operator; never cached (pages can hold secrets)."""
    templates = console_of(request).templates
    response = templates.TemplateResponse(
        request,
        template,
        {
            "operator": session.operator if session else None,
            "csrf": session.csrf_token if session else None,
            "error": error,
            "notice": notice,
            "path": request.url.path,
            **context,
        },
        status_code=status,
    )
    response.headers["cache-control"] = "no-store"
    return response


def done(location: str, code: str) -> RedirectResponse:
    """After a change: back to ``location`` (POST, redirect, GET), with the notice ``code``."""
    separator = "&" if "?" in location else "?"
    return RedirectResponse(f"{location}{separator}done={code}", status_code=303)


def when(value: datetime | None) -> str:
    """A time as operators read it: UTC, to the second."""
    return "never" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Bar:
    """One bar of the enrolments chart, in SVG units."""

    x: float
    y: float
    width: float
    height: float
    label: str
    count: int


CHART_WIDTH = 480
CHART_HEIGHT = 120


def enrolment_bars(enrolments: Enrolments) -> list[Bar]:
    """The bars of the overview's chart (drawn as inline SVG: no script, no style attribute)."""
    hours = len(enrolments.per_hour) or 1
    peak = max(enrolments.per_hour, default=0) or 1
    slot = CHART_WIDTH / hours
    bars = []
    for index, count in enumerate(enrolments.per_hour):
        height = (CHART_HEIGHT - 4) * count / peak
        hour = (enrolments.start.hour + index) % 24
        bars.append(
            Bar(
                x=round(index * slot + 1, 2),
                y=round(CHART_HEIGHT - height, 2),
                width=round(slot - 2, 2),
                height=round(height, 2),
                label=f"{hour:02d}:00",
                count=count,
            )
        )
    return bars
