"""The figures of the benchmark, in the order they run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.bench.context import Context
from tests.bench.results import FigureResult


@dataclass(frozen=True)
class Figure:
    """A named figure and the function that measures it."""

    name: str
    title: str
    run: Callable[[Context], FigureResult]


def all_figures() -> list[Figure]:
    """Every figure, imported on demand (the modules pull in the product and amqtt)."""
    from tests.bench.figures import (  # noqa: PLC0415
        api_pages,
        cold_storm,
        enrol_burst,
        event_loop,
        flood,
        http_provisioning,
        login_timing,
        many_subscribers,
        memory,
        mosquitto_storm,
        provisioning_rate,
        rabbitmq_storm,
        registry,
        restart_storm,
        subscribe_storm,
        throughput,
        warm_storm,
    )

    modules = [
        warm_storm,
        cold_storm,
        provisioning_rate,
        http_provisioning,
        throughput,
        registry,
        api_pages,
        memory,
        login_timing,
        restart_storm,
        flood,
        enrol_burst,
        event_loop,
        many_subscribers,
        subscribe_storm,
        mosquitto_storm,
        rabbitmq_storm,
    ]
    return [Figure(m.NAME, m.TITLE, m.run) for m in modules]


__all__ = ["Figure", "all_figures"]
