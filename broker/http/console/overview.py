"""``/``: the fleet at a glance: devices per status, online now, enrolments over the last day."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker.http.console.render import CHART_HEIGHT, CHART_WIDTH, enrolment_bars, page
from broker.http.console.security import ConsoleDep, Session
from provisioning.registry import DeviceStatus

router = APIRouter(include_in_schema=False)


@router.get("/")
async def overview(request: Request, console: ConsoleDep, session: Session) -> Response:
    """The overview; with ``?fragment=1`` only its figures (polled by the page)."""
    counts = await console.fleet.status_counts()
    enrolments = await console.fleet.enrolments()
    template = "_overview_figures.html" if request.query_params.get("fragment") else "overview.html"
    return page(
        request,
        template,
        session,
        counts=[(s.value, counts.get(s.value, 0)) for s in DeviceStatus],
        total=sum(counts.values()),
        online=counts.get(DeviceStatus.ONLINE.value, 0),
        pending=counts.get(DeviceStatus.PENDING.value, 0),
        enrolments=enrolments,
        bars=enrolment_bars(enrolments),
        chart_width=CHART_WIDTH,
        chart_height=CHART_HEIGHT,
    )
