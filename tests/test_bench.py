"""The benchmark's own logic: arguments, aggregation, goals, the result file, the table.

Nothing here asserts on timings; the one end-to-end test only checks that a quick figure runs
and writes both sides and a ratio.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from provisioning.mac import parse_mac
from provisioning.registry import DeviceStatus
from tests.bench import cli, plot
from tests.bench.context import QUICK, Context
from tests.bench.figures import (
    all_figures,
    api_pages,
    enrol_burst,
    event_loop,
    flood,
    http_provisioning,
    many_subscribers,
    mosquitto_storm,
    rabbitmq_storm,
    restart_storm,
    subscribe_storm,
)
from tests.bench.figures.common import (
    StormSummary,
    describe_logins,
    free_port,
    held_connections,
    held_on_each,
    mean_retries,
    mqttprov_settings,
    sqlite_url,
    summarize_storm,
)
from tests.bench.figures.external import (
    Side,
    cpu_row,
    load_average,
    load_note,
    login_latency_rows,
    storm_rows,
)
from tests.bench.figures.http_api import with_api
from tests.bench.fleet import create_registry, mac_for, make_fleet
from tests.bench.load import IdleTask, Login, ProvisionResult, StormResult
from tests.bench.logins import FloodResult, RetryLoginResult, flood_login
from tests.bench.mqtt import (
    PUBLISH,
    SUBSCRIBE,
    PacketReader,
    connect_packet,
    publish_packet,
    remaining_length,
    subscribe_filters_packet,
    subscribe_packet,
)
from tests.bench.results import (
    HEADERS,
    TIMES,
    FigureResult,
    Goal,
    Report,
    Row,
    number,
    percentile,
    ratio,
    render_table,
)
from tests.bench.served import ServedBroker, ServedKind
from tests.helpers import connack_code

# Out of the fast loop as a whole: several tests start brokers, or the bench itself, as processes.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


# -- arguments ----------------------------------------------------------------------------------


def test_defaults_run_every_figure_in_order() -> None:
    options = cli.parse_args([])
    assert options == cli.Options(quick=False, json_file=None, only=cli.FIGURE_NAMES, plot_dir=None)


def test_every_option_is_parsed(tmp_path: Path) -> None:
    options = cli.parse_args(
        ["--quick", "--json", str(tmp_path / "r.json"), "--only", "memory", "--plot", str(tmp_path)]
    )
    assert options.quick is True
    assert options.json_file == tmp_path / "r.json"
    assert options.only == ("memory",)
    assert options.plot_dir == tmp_path


def test_only_repeats_and_commas_keep_run_order() -> None:
    options = cli.parse_args(["--only", "memory, registry", "--only", "warm-storm", "--only", "memory"])
    assert options.only == ("warm-storm", "registry", "memory")


def test_an_unknown_figure_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--only", "warm-storm,nonsense"])
    assert exited.value.code == 2
    assert "unknown figure nonsense" in capsys.readouterr().err


def test_select_figures_without_a_parser_raises() -> None:
    with pytest.raises(ValueError, match="unknown figure bogus"):
        cli.select_figures(["bogus"])
    assert cli.select_figures([]) == cli.FIGURE_NAMES


def test_the_figure_list_matches_the_figure_modules() -> None:
    assert tuple(figure.name for figure in all_figures()) == cli.FIGURE_NAMES


# -- aggregation and goals ----------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


@pytest.mark.parametrize("bad", [-1.0, 100.5])
def test_percentile_refuses_nonsense(bad: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], bad)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_ratio_needs_both_sides_and_a_nonzero_reference() -> None:
    assert ratio(9.0, 10.0) == pytest.approx(0.9)
    assert ratio(None, 10.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


@pytest.mark.parametrize(
    ("goal", "ours", "reference", "met"),
    [
        (Goal("ratio_at_least", 0.9), 95.0, 100.0, True),
        (Goal("ratio_at_least", 0.9), 85.0, 100.0, False),
        (Goal("ratio_at_least", 0.9), 90.0, 100.0, True),
        (Goal("ratio_at_most", 1.2), 110.0, 100.0, True),
        (Goal("ratio_at_most", 1.2), 130.0, 100.0, False),
        (Goal("at_most", 50.0, "ms"), 49.0, None, True),
        (Goal("at_most", 50.0, "ms"), 51.0, 1.0, False),
        (Goal("ratio_at_least", 0.9), 1.0, None, None),
        (Goal("at_most", 50.0, "ms"), None, 1.0, None),
    ],
)
def test_goals_are_met_or_not(
    goal: Goal, ours: float | None, reference: float | None, met: bool | None
) -> None:
    assert Row("x", "u", ours, reference, goal=goal).met is met


def test_a_row_without_a_goal_is_neither_met_nor_missed() -> None:
    assert Row("x", "u", 1.0, 2.0).met is None


def test_goal_texts() -> None:
    assert Goal("ratio_at_least", 0.9).text() == f"≥ 0.9{TIMES}"
    assert Goal("ratio_at_most", 1.2).text() == f"≤ 1.2{TIMES}"
    assert Goal("at_most", 50.0, "ms").text() == "≤ 50 ms"


def test_storm_processes_are_aggregated_over_the_whole_span() -> None:
    first = StormResult(10.0, 12.0, 100, {5: 1}, {}, [1.0] * 100)
    second = StormResult(10.5, 14.0, 100, {5: 2, 3: 1}, {"TimeoutError": 4}, [3.0] * 100)
    summary = summarize_storm([first, second])
    assert summary.accepted == 200
    assert summary.seconds == pytest.approx(4.0)
    assert summary.rate == pytest.approx(50.0)
    assert summary.refused == {5: 3, 3: 1}
    assert summary.errors == {"TimeoutError": 4}
    assert summary.p50_ms == pytest.approx(2.0)
    assert summary.failures == "1 CONNACK 3, 3 CONNACK 5, 4 TimeoutError"


# -- the result file and the table --------------------------------------------------------------


def _report() -> Report:
    storm = FigureResult(
        "warm-storm",
        "warm reconnect storm",
        rows=[
            Row(
                "warm reconnect storm",
                "connects/s",
                450.0,
                1000.0,
                "amqtt anonymous",
                Goal("ratio_at_least", 0.9),
                [440.0, 460.0],
                [990.0, 1010.0],
            ),
            Row("delivery p99", "ms", 12.5, 3.0, "no storm", Goal("at_most", 50.0, "ms")),
        ],
        processes={"mqttprov": "1 process"},
        sizes={"devices": 10.0},
        notes=["a note"],
        seconds=1.234,
        series={"round 1": [(0.0, 1.0)]},
    )
    crashed = FigureResult("memory", "memory at idle connections", error="Traceback: boom")
    return Report(
        "2026-01-01T00:00:00+00:00", quick=True, machine={"nproc": 2}, figures=[storm, crashed], seconds=12.0
    )


def test_the_json_file_has_both_sides_ratio_goal_and_samples() -> None:
    data = json.loads(json.dumps(_report().as_json()))
    assert data["version"] == 1
    assert data["quick"] is True
    assert data["crashed"] is True
    assert [figure["name"] for figure in data["figures"]] == ["warm-storm", "memory"]
    row = data["figures"][0]["rows"][0]
    assert row["ours"] == 450.0
    assert row["reference"] == 1000.0
    assert row["ratio"] == pytest.approx(0.45)
    assert row["goal"] == {"kind": "ratio_at_least", "value": 0.9, "unit": "", "text": f"≥ 0.9{TIMES}"}
    assert row["met"] is False
    assert row["samples"] == {"ours": [440.0, 460.0], "reference": [990.0, 1010.0]}
    assert data["figures"][0]["processes"] == {"mqttprov": "1 process"}
    assert "series" not in data["figures"][0]
    assert data["figures"][1]["error"] == "Traceback: boom"
    assert data["figures"][1]["rows"] == []


def test_the_table_shows_every_row_and_marks_misses_and_crashes() -> None:
    table = render_table(_report().figures)
    lines = table.splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == list(HEADERS)
    assert len({len(line) for line in lines}) == 1  # aligned columns
    storm, latency, crashed = lines[2:]
    assert "450 connects/s" in storm
    assert "1,000 connects/s (amqtt anonymous)" in storm
    assert f"0.45{TIMES}" in storm
    assert "**no**" in storm
    assert "12.5 ms" in latency
    assert "yes" in latency
    assert "crashed" in crashed


def test_numbers_are_rounded_for_people() -> None:
    assert number(1234.4, "msg/s") == "1,234 msg/s"
    assert number(12.345, "ms") == "12.3 ms"
    assert number(1.2345) == "1.23"
    assert number(None, "ms") == "—"


def test_a_crash_is_the_only_nonzero_exit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    report = _report()
    monkeypatch.setattr(cli, "run", lambda _options: report)
    assert cli.main(["--quick", "--json", str(tmp_path / "r.json")]) == cli.EXIT_CRASH
    report.figures.pop()  # only the missed goal is left
    assert cli.main(["--quick", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["crashed"] is False


def test_no_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(plot, "matplotlib_available", lambda: False)
    message = plot.write_plots(_report().figures, tmp_path / "plots")
    assert "matplotlib is not installed" in message
    assert not (tmp_path / "plots").exists()
    assert "no plot" in plot.write_plots([FigureResult("registry", "registry lookups")], tmp_path)


# -- the raw MQTT client and the fleet ------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "encoded"),
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"), (16384, b"\x80\x80\x01")],
)
def test_remaining_length_encoding(length: int, encoded: bytes) -> None:
    assert remaining_length(length) == encoded


def test_the_packet_reader_splits_a_stream_fed_in_pieces() -> None:
    stream = (
        publish_packet("a/b", b"x" * 200, qos=1, packet_id=7)
        + publish_packet("c", b"")
        + bytes([0x20, 2, 0, 0])
    )
    reader = PacketReader()
    packets = [p for n in range(0, len(stream), 3) for p in reader.feed(stream[n : n + 3])]
    assert [p.kind for p in packets] == [PUBLISH, PUBLISH, 2]
    assert packets[0].publish() == ("a/b", 7, b"x" * 200)
    assert packets[1].publish() == ("c", None, b"")
    assert packets[2].body == b"\x00\x00"


def test_connect_packet_carries_credentials() -> None:
    packet = connect_packet("id", "user", "secret", keep_alive=30)
    assert packet[0] == 0x10
    assert packet.endswith(b"\x00\x02id\x00\x04user\x00\x06secret")
    assert packet[2:12] == b"\x00\x04MQTT\x04\xc2\x00\x1e"


def test_fleet_macs_are_distinct_and_valid() -> None:
    macs = [mac_for(n) for n in (0, 1, 255, 256, 70_000, 2**32 - 1)]
    assert len(set(macs)) == len(macs)
    assert all(parse_mac(mac) == mac for mac in macs)
    assert mac_for(1, prefix=0x06).startswith("06:")


def test_fleet_statuses_follow_the_mix() -> None:
    fleet = make_fleet(100, cost=4, statuses=((DeviceStatus.OFFLINE, 0.7), (DeviceStatus.PENDING, 0.3)))
    statuses = [device.status for device in fleet.devices]
    assert statuses.count(DeviceStatus.OFFLINE) == 70
    assert statuses.count(DeviceStatus.PENDING) == 30
    assert len(fleet.hashes) == 4
    assert {device.password for device in fleet.devices} == set(fleet.hashes)


# -- end to end -----------------------------------------------------------------------------------


def test_quick_throughput_figure_runs_and_writes_both_sides(tmp_path: Path) -> None:
    result_file = tmp_path / "bench.json"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MQTTPROV_") or k.startswith("MQTTPROV_TEST_")
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--only", "throughput", "--json", str(result_file)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(result_file.read_text())
    (figure,) = data["figures"]
    assert figure["name"] == "throughput"
    assert figure["error"] is None
    row = figure["rows"][0]
    assert row["ours"] > 0
    assert row["reference"] > 0
    assert row["ratio"] == pytest.approx(row["ours"] / row["reference"])
    assert "| figure" in done.stdout


# -- the external-broker figures (Mosquitto, RabbitMQ) ---------------------------------------------


def test_the_external_broker_figures_run_last_and_parse() -> None:
    assert cli.FIGURE_NAMES[-2:] == ("mosquitto-storm", "rabbitmq-storm")
    options = cli.parse_args(["--only", "rabbitmq-storm,mosquitto-storm", "--only", "warm-storm"])
    assert options.only == ("warm-storm", "mosquitto-storm", "rabbitmq-storm")


def _summary(rate: float, refused: dict[int, int] | None = None) -> StormSummary:
    return StormSummary(rate, 10, refused or {}, {}, 1.0, 0.0, 1.0, 1.0, 2.0)


def test_external_storm_rows_compare_medians_with_the_goal() -> None:
    logged: list[str] = []
    ctx = Context(QUICK, quick=True, workdir=Path(), log=logged.append)
    ours, reference = Side("ours"), Side("ref")
    for rate in (100.0, 300.0, 200.0):
        ours.record(ctx, "cold", 1, _summary(rate))
    ours.record(ctx, "warm", 1, _summary(80.0, {4: 2}))
    reference.record(ctx, "cold", 1, _summary(400.0))
    reference.record(ctx, "warm", 1, _summary(100.0))
    ours.record_cpu("warm", {"node a": 10.0, "authd": 5.0})
    reference.record_cpu("warm", {"node a": 10.0})
    cold, warm = storm_rows("Broker + us", ours, reference, "internal")
    assert (cold.label, cold.ours, cold.reference, cold.ratio, cold.met) == (
        "cold login storm, Broker + us",
        200.0,
        400.0,
        0.5,
        False,
    )
    assert cold.ours_samples == [100.0, 300.0, 200.0]
    assert warm.ratio == pytest.approx(0.8)
    assert warm.met is True
    assert ours.problems == ["round 1 warm ours: 2 CONNACK 4"]
    assert len(logged) == 6
    cpu = cpu_row("Broker + us", ours, reference, "internal")
    assert (cpu.ours, cpu.reference, cpu.goal) == (15.0, 10.0, None)
    assert ours.cpu_notes() == ["CPU µs per login, ours, warm: node a 10, authd 5"]
    cold_p99, warm_p99 = login_latency_rows(ours, reference, "internal")
    # Every summary above had a login p99 of 2 ms: three cold storms and one warm on our side.
    assert (cold_p99.label, cold_p99.ours_samples, cold_p99.reference) == (
        "device login p99 during the cold storm",
        [2.0, 2.0, 2.0],
        2.0,
    )
    assert (warm_p99.ours, warm_p99.goal) == (2.0, None)


def test_a_storm_round_without_logins_gives_no_ratio() -> None:
    cold, warm = storm_rows("x", Side("ours"), Side("ref"), "ref")
    assert (cold.ours, cold.ratio, cold.met, warm.met) == (None, None, None, None)


METRICS = """\
# TYPE mqttprov_authd_request_seconds histogram
mqttprov_authd_request_seconds_bucket{contract="emqx",le="0.001"} 7.0
mqttprov_authd_request_seconds_bucket{contract="rabbitmq",le="0.001"} 50.0
mqttprov_authd_request_seconds_bucket{contract="rabbitmq",le="0.0025"} 90.0
mqttprov_authd_request_seconds_bucket{contract="rabbitmq",le="0.005"} 100.0
mqttprov_authd_request_seconds_bucket{contract="rabbitmq",le="+Inf"} 100.0
mqttprov_authd_request_seconds_sum{contract="rabbitmq"} 0.12
"""


def test_authd_latency_buckets_are_read_and_interpolated() -> None:
    after = rabbitmq_storm.parse_buckets(METRICS)
    assert after == {0.001: 50, 0.0025: 90, 0.005: 100, math.inf: 100}
    before = {0.001: 10, 0.0025: 10, 0.005: 10, math.inf: 10}
    delta = rabbitmq_storm.bucket_delta(before, after)
    assert delta == {0.001: 40, 0.0025: 80, 0.005: 90, math.inf: 90}
    # Rank 45 of 90: the 5th of the 40 observations in (0.001, 0.0025].
    assert rabbitmq_storm.histogram_quantile(delta, 0.5) == pytest.approx(0.001 + 0.0015 * 5 / 40)
    # Rank 4.5: in the first bucket, interpolated from 0.
    assert rabbitmq_storm.histogram_quantile(delta, 0.05) == pytest.approx(0.001 * 4.5 / 40)
    # 89.1: in the (0.0025, 0.005] bucket, which holds 10.
    assert rabbitmq_storm.histogram_quantile(delta, 0.99) == pytest.approx(0.0025 + 0.0025 * 9.1 / 10)
    assert rabbitmq_storm.histogram_quantile({math.inf: 0}, 0.5) is None
    # Past the highest finite bound: that bound (as Prometheus answers).
    assert rabbitmq_storm.histogram_quantile({0.001: 1, math.inf: 10}, 0.99) == 0.001


def test_latency_rows_take_the_median_over_rounds() -> None:
    rows = rabbitmq_storm.latency_rows({"warm": [(0.5, 2.0, 2.0), (0.7, 4.0, 2.0)]})
    assert [(row.label, row.ours, row.goal) for row in rows] == [
        ("authd request p50 during the warm storm", pytest.approx(0.6), None),
        ("authd request p99 during the warm storm", 3.0, None),
    ]


def test_internal_users_are_created_in_one_erlang_expression() -> None:
    logins = [Login("device_ab12", "device_ab12", "pw-1"), Login("device_cd34", "device_cd34", "pw-2")]
    expression = rabbitmq_storm.add_users_expression(logins)
    assert '{<<"device_ab12">>, <<"pw-1">>}, {<<"device_cd34">>, <<"pw-2">>}' in expression
    assert "rabbit_auth_backend_internal:add_user(U, P," in expression
    assert expression.endswith("ok.")
    with pytest.raises(ValueError, match="escaping"):
        rabbitmq_storm.add_users_expression([Login("d", "d", 'pw">>, evil')])


@pytest.mark.parametrize(
    ("module", "probe"), [(rabbitmq_storm, "rabbitmq_missing"), (mosquitto_storm, "mosquitto_missing")]
)
def test_an_absent_broker_is_a_note_not_a_crash(
    module: ModuleType, probe: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(module, probe, lambda: "/usr/lib/nothing not found")
    result = module.run(Context(QUICK, quick=True, workdir=tmp_path, log=lambda _: None))
    assert result.rows == []
    assert result.error is None
    assert len(result.notes) == 1
    assert "not available: /usr/lib/nothing not found" in result.notes[0]


def test_the_load_note_names_both_load_averages_and_the_cpus() -> None:
    note = load_note(7.25)
    assert note.startswith(f"1-minute load average 7.2 at the start, {load_average():.1f} at the end")
    assert f"on {os.cpu_count()} CPUs" in note


@pytest.mark.parametrize(("kind", "connack"), [("mqttprov", 5), ("amqtt-anonymous", 0)])
def test_a_served_broker_runs_as_its_users_start_it_and_stops(
    tmp_path: Path, kind: ServedKind, connack: int
) -> None:
    port = free_port()
    settings = (
        mqttprov_settings(sqlite_url(tmp_path / "served.db"), port, cost=4) if kind == "mqttprov" else None
    )
    with ServedBroker(kind, port, tmp_path, settings=settings) as broker:
        assert broker.rss_kib() > 10_000  # the interpreter running the broker, not a wrapper
        # Listening once started: an anonymous CONNECT is refused by ours, accepted by amqtt.
        assert connack_code("127.0.0.1", port) == connack
    assert not Path(f"/proc/{broker.pid}").exists()
    if kind == "mqttprov":  # amqtt logs the probe's dropped connection as an error
        assert broker.log_summary() == []


# -- restart storm, flood, enrolment burst, event loop ---------------------------------------------

#: The new figures at sizes that run in seconds: structure only, never a timing.
TINY = replace(
    QUICK,
    rounds=1,
    warm_devices=5,
    warm_reconnects=10,
    throughput_devices=2,
    throughput_messages=50,
    storm_concurrency=5,
    restart_devices=4,
    restart_rounds=1,
    restart_cost=4,
    flood_devices=2,
    flood_concurrency=4,
    flood_provisions=1,
    flood_cost=4,
    flood_seconds=10.0,
    enrol_devices=3,
    enrol_cost=5,
    enrol_rounds=1,
    many_subscribers=5,
    many_subscribers_messages=20,
    storm_retained=20,
    storm_subscribes=2,
    subscription_rounds=1,
)


def test_the_new_figures_run_before_the_external_brokers() -> None:
    names = cli.FIGURE_NAMES
    assert names[names.index("login-timing") + 1 : -2] == (
        "restart-storm",
        "flood",
        "enrol-burst",
        "uvloop",
        "many-subscribers",
        "subscribe-storm",
    )


def test_the_flood_alternates_invented_and_real_usernames_with_fresh_passwords() -> None:
    real = ("device_aa", "device_bb")
    logins = [flood_login(real, n) for n in range(6)]
    invented = logins[0::2]
    assert all((login.username or "").startswith("device_") for login in invented)
    assert all(login.username not in real for login in invented)
    assert [login.username for login in logins[1::2]] == ["device_aa", "device_bb", "device_aa"]
    assert len({login.password for login in logins}) == 6
    assert all(login.client_id == login.username for login in logins)
    assert flood_login((), 1).username not in real  # no real usernames: invented only


def _logins(retries: list[int], latencies: list[float | None]) -> RetryLoginResult:
    return RetryLoginResult(10.0, 12.0, retries, latencies, {4: 1}, {"TimeoutError": 2})


def test_retrying_logins_count_acceptances_and_retries() -> None:
    result = _logins([0, 3, 1], [5.0, None, 900.0])
    assert result.accepted == 2
    assert result.rate == pytest.approx(1.0)
    assert mean_retries(result) == pytest.approx(4 / 3)
    assert describe_logins(result) == (
        "2 of 3 in 2.00 s = 1.0/s; CONNACK 3 retries max 3, mean 1.33, 1 CONNACK 4, 2 TimeoutError"
    )
    assert _logins([], []).rate == 0.0


@pytest.mark.parametrize(
    ("retries", "latencies", "met"),
    [
        ([0, 2], [1.0, 2.0], [True, True]),
        ([0, 3], [1.0, 2.0], [True, False]),
        ([0, 0], [1.0, None], [False, True]),
    ],
)
def test_flood_rows_need_every_device_in_with_a_couple_of_retries(
    retries: list[int], latencies: list[float | None], met: list[bool]
) -> None:
    quiet = _logins([0, 0], [1.0, 1.0])
    provisioned = ProvisionResult(0.0, 1.0, {"ok": 1}, [40.0])
    flooded = FloodResult(0.0, 2.0, {3: 10, 4: 6}, {"TimeoutError": 4}, sent=20)
    rows = flood.rows(
        2,
        quiet=quiet,
        during=_logins(retries, latencies),
        flooded=flooded,
        quiet_provisioning=provisioned,
        provisioning=ProvisionResult(0.0, 1.0, {"ok": 1}, [80.0]),
    )
    by_label = {row.label: row for row in rows}
    assert [by_label["flood: real devices in (first logins)"].met, rows[1].met] == met
    assert by_label["flood: bad CONNECTs sent"].ours == 10.0
    assert by_label["flood: refusals of the flood (answered)"].ours == 8.0
    assert by_label["flood: provisioning latency p50"].ratio == 2.0


def test_a_served_broker_restarts_on_its_files_and_settles(tmp_path: Path) -> None:
    port = free_port()
    settings = mqttprov_settings(sqlite_url(tmp_path / "restart.db"), port, cost=4)
    with ServedBroker("mqttprov", port, tmp_path, settings=settings) as broker:
        first = broker.pid
        offset = broker.log_offset()
        stop_seconds, start_seconds = broker.restart()
        assert broker.pid != first
        assert stop_seconds > 0
        assert start_seconds > 0
        assert connack_code("127.0.0.1", port) == 5
        _waited, how = broker.wait_idle(30.0, log_line=b"broker started", since=offset)
        assert how == "log line"
        _waited, how = broker.wait_idle(30.0)
        assert how in ("CPU idle", "timeout")
    log = broker.log_file.read_text()
    assert log.count("broker started") == 2
    assert log.count("broker stopped") == 2


@pytest.mark.parametrize("module", [restart_storm, flood, enrol_burst, event_loop])
def test_the_new_figures_run_at_tiny_sizes(module: ModuleType, tmp_path: Path) -> None:
    logged: list[str] = []
    result = module.run(Context(TINY, quick=True, workdir=tmp_path, log=logged.append))
    assert result.error is None
    assert result.name == module.NAME
    assert result.rows
    assert all(row.goal is None or row.goal.text() for row in result.rows)
    first = result.rows[0]
    assert first.ours is not None
    assert first.reference is not None
    assert first.reference > 0
    assert logged


# -- many subscribers, subscribe storm ----------------------------------------------------------


def test_a_retained_publish_and_a_subscribe_with_many_filters_are_well_formed() -> None:
    assert publish_packet("a/b", b"x")[0] == 0x30
    assert publish_packet("a/b", b"x", retain=True)[0] == 0x31
    assert publish_packet("a/b", b"x", qos=1, packet_id=9, retain=True)[0] == 0x33
    (packet,) = PacketReader().feed(subscribe_filters_packet(("a/#", "b/+/c"), qos=1, packet_id=7))
    assert (packet.kind, packet.flags) == (SUBSCRIBE, 0x02)
    assert packet.body == b"\x00\x07" + b"\x00\x03a/#\x01" + b"\x00\x05b/+/c\x01"
    assert subscribe_packet("a/#", qos=1, packet_id=7) == subscribe_filters_packet(
        ("a/#",), qos=1, packet_id=7
    )


def test_the_storm_filters_are_distinct_valid_and_half_wildcards() -> None:
    namespace = "devices/0a1b/"
    filters = subscribe_storm.storm_filters(namespace, 32)
    assert len(set(filters)) == 32
    assert all(f.startswith(namespace) for f in filters)
    assert sum("+" in f or "#" in f for f in filters) == 16
    for topic_filter in filters:
        levels = topic_filter.split("/")
        # Wildcards are whole levels, '#' only last, as a broker checks before it takes them.
        assert all(level in ("+", "#") or not {"+", "#"} & set(level) for level in levels)
        assert "#" not in levels[:-1]
    assert subscribe_storm.storm_filters(namespace, 3) == (
        namespace + "#",
        namespace + "sensor/0/value",
        namespace + "sensor/1/value",
    )


def test_idle_connections_take_one_filter_per_login_or_none() -> None:
    logins = (Login("a", "a", "p"), Login("b", "b", "p"))
    assert IdleTask(1, logins, 1, 1.0, topic_filters=("a/#", "b/#")).topic_filters == ("a/#", "b/#")
    with pytest.raises(ValueError, match="one filter per login"):
        IdleTask(1, logins, 1, 1.0, topic_filters=("a/#",))


def test_held_connections_subscribe_and_a_refused_filter_is_no_held_connection(tmp_path: Path) -> None:
    fleet = make_fleet(2, cost=4)
    url = sqlite_url(tmp_path / "held.db")
    create_registry(url, fleet)
    own = fleet.devices[0]
    # The second device asks for the first one's namespace: the ACL refuses it (SUBACK 0x80).
    filters = [own.namespace + "#", own.namespace + "#"]
    port = free_port()
    with (
        ServedBroker("mqttprov", port, tmp_path, settings=mqttprov_settings(url, port, cost=4)),
        held_connections(
            port, fleet.logins(), concurrency=2, time_limit=30.0, name="held", topic_filters=filters
        ) as held,
    ):
        assert held.connected == 1
        assert held.errors == {"MqttError": 1}
        assert held.refused == {}


def test_held_connections_try_again_after_connack_3_until_the_time_limit(tmp_path: Path) -> None:
    fleet = make_fleet(2, cost=4)
    url = sqlite_url(tmp_path / "retry.db")
    create_registry(url, fleet)
    port = free_port()
    # One connection per address: the second device is told CONNACK 3 for as long as the first is in.
    settings = mqttprov_settings(url, port, cost=4, broker={"max_connections_per_address": 1})
    with (
        ServedBroker("mqttprov", port, tmp_path, settings=settings),
        held_on_each(
            [port], fleet.logins(), concurrency=2, time_limit=2.0, name="retry", retry_delay=0.2
        ) as (held,),
    ):
        assert held.connected == 1
        assert held.retries >= 2
        assert held.refused == {}
        assert held.errors == {}


def test_many_subscribers_runs_at_tiny_sizes_with_its_baseline(tmp_path: Path) -> None:
    logged: list[str] = []
    result = many_subscribers.run(Context(TINY, quick=False, workdir=tmp_path, log=logged.append))
    assert result.error is None
    crowded, cpu, alone = result.rows
    assert crowded.goal == Goal("ratio_at_least", 0.7)
    for row in (crowded, cpu, alone):
        assert row.ours is not None
        assert row.reference is not None
        assert row.reference > 0
    assert sum("5 devices connected and subscribed" in line for line in logged) == 2
    assert not [note for note in result.notes if "not delivered" in note or "only" in note]


def test_subscribe_storm_runs_at_tiny_sizes_and_no_filter_is_refused(tmp_path: Path) -> None:
    logged: list[str] = []
    result = subscribe_storm.run(Context(TINY, quick=True, workdir=tmp_path, log=logged.append))
    assert result.error is None
    worst, _p99, _quiet, rate = result.rows
    assert worst.goal == Goal("at_most", 1000.0, "ms")
    assert rate.ours is not None
    assert rate.reference is not None
    assert rate.reference > 0
    assert sum("20 retained messages stored" in line for line in logged) == 2
    storms = [line for line in logged if "SUBSCRIBEs in" in line]
    assert len(storms) == 2
    granted = 2 * subscribe_storm.FILTERS
    assert all(f"({granted} filters granted, 0 refused" in line for line in storms)


# -- the HTTP API: device pages, HTTP against MQTT provisioning -------------------------------------

#: Both API figures in seconds: a few hundred devices, a handful of requests.
API_TINY = replace(
    TINY, registry_devices=300, api_page_requests=4, provision_devices=4, provision_concurrency=2
)


def test_the_api_is_asked_for_a_port_the_os_picks() -> None:
    settings = with_api(mqttprov_settings("sqlite+aiosqlite:///x.db", 1, cost=4, api={"host": "127.0.0.1"}))
    assert settings["api"] == {"host": "127.0.0.1", "enabled": "true", "port": 0}


def test_api_pages_run_at_tiny_sizes_against_the_same_pages_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTTPROV_API__ENABLED", "true")  # conftest turns it off for every test
    logged: list[str] = []
    result = api_pages.run(Context(API_TINY, quick=True, workdir=tmp_path, log=logged.append))
    assert result.error is None
    backends = ["SQLite"] + (
        ["PostgreSQL"] if not any("PostgreSQL skipped" in n for n in result.notes) else []
    )
    kinds = ("page 1", "deep page by offset", "deep page by cursor", "label filter", "q prefix")
    # Per backend: p50 and p99 of every kind against in-process, then the deep pages against page 1.
    assert len(result.rows) == len(backends) * (2 * len(kinds) + 2)
    for row in result.rows:
        assert row.ours is not None
        assert row.reference is not None
        assert row.reference > 0
    by_label = {row.label: row for row in result.rows}
    cursor = by_label["API deep page by cursor vs page 1, 300, SQLite (p50)"]
    assert cursor.goal == Goal("ratio_at_most", 1.5)
    # Every page's total was compared with the registry's (a difference crashes the figure).
    assert sum("SQLite: " in line and "HTTP p50" in line for line in logged) == len(kinds)


def test_http_provisioning_runs_at_tiny_sizes_and_every_device_enrols(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTTPROV_API__ENABLED", "true")  # conftest turns it off for every test
    logged: list[str] = []
    result = http_provisioning.run(Context(API_TINY, quick=True, workdir=tmp_path, log=logged.append))
    assert result.error is None
    rate, p50, p99 = result.rows
    assert rate.goal == Goal("ratio_at_least", 0.8)
    assert rate.ratio is not None
    for row in (p50, p99):
        assert row.ours is not None
        assert row.reference is not None
    assert not [note for note in result.notes if "round" in note]  # only refusals get a note
    rounds = [line for line in logged if line.startswith("round ")]
    assert len(rounds) == 2 * API_TINY.http_provision_rounds
    assert all("4 devices in" in line and "{'ok': 4}" in line for line in rounds)
