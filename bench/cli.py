"""`appliance bench`: the command-line face of the benchmark."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import FrameType

import click

from bench.load import LOAD_KINDS, RunResult
from bench.processes import BenchError
from bench.report import render_tables, to_json, write_chart
from bench.runner import MEASUREMENTS, BenchOptions, run_benchmark
from bench.scenarios import REFERENCE, SCENARIOS

QUICK_MESSAGES = 5_000
QUICK_RUNS = 1
QUICK_DURATION_S = 1.5
QUICK_REPLAY_MESSAGES = 100_000
QUICK_AUDIT_ROWS = 1_000_000
# mosquitto_pub -l at QoS 1 disconnects early once its packet identifiers wrap (after 65,535
# messages): it sees the ack of an earlier message with the last identifier and stops.
MAX_MESSAGES_QOS1 = 65_535


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds, so every scenario and client is stopped


def _progress(result: RunResult) -> None:
    label = "warm-up" if result.round == 0 else f"run {result.round}"
    if result.ok:
        assert result.msg_per_s is not None
        outcome = f"{result.msg_per_s:>9,.0f} msg/s"
    else:
        outcome = f"FAILED: {result.error}"
    if result.ok and result.cloud_msg_per_s:
        outcome += f", cloud {result.cloud_msg_per_s:>9,.0f} msg/s"
    if result.ok and result.latency_ms:
        outcome += "".join(f", {where} p99 {stats['p99']:.2f} ms" for where, stats in result.latency_ms.items())
    click.echo(f"  {label:<7} QoS {result.qos} {result.load:<18} {result.scenario:<15} {outcome}", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True,
              help=f"A smoke run of about a minute: {QUICK_MESSAGES:,} messages, {QUICK_RUNS} run, no warm-up, "
              f"{QUICK_DURATION_S} s at the fixed rate and QoS 1 only there, replay over {QUICK_REPLAY_MESSAGES:,} "
              f"messages and audit-sql over {QUICK_AUDIT_ROWS:,} verdicts (unless given).")
@click.option("--runs", type=click.IntRange(min=1), help="Measured runs per scenario and load; medians are reported. [default: 3]")
@click.option("--messages", type=click.IntRange(min=1, max=999_999), help="Messages per run; at most 65,535 with QoS 1. [default: 50,000]")
@click.option("--warmup/--no-warmup", default=None, help="Run once first and discard it. [default: on, off with --quick]")
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice([*SCENARIOS, *MEASUREMENTS]),
              help=f"Scenario to run (repeatable); {' and '.join(MEASUREMENTS)} need no broker: replay's rate over a "
              f"generated recording, `appliance audit sql` GROUP BY over generated verdicts. [default: all; {REFERENCE} "
              "is always included with a broker scenario, for the ratios]")
@click.option("--qos", "qos", multiple=True, type=click.Choice(["0", "1"]), help="QoS to run (repeatable). [default: 0 and 1]")
@click.option("--load", "loads", multiple=True, type=click.Choice(list(LOAD_KINDS)),
              help="Load to run (repeatable): one pipelined publisher, 100 sensors flat out, 100 sensors at --rate. [default: all]")
@click.option("--rate", type=click.FloatRange(min=4), default=1000.0, show_default=True,
              help="Total msg/s of the fixed-rate load (latency).")
@click.option("--duration", type=click.FloatRange(min=0.1), help="Seconds of the fixed-rate load. [default: 5]")
@click.option("--workdir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Where the brokers' and appliances' state goes (not tmpfs: disk writes are measured). [default: $TMPDIR]")
@click.option("--replay-messages", type=click.IntRange(min=1),
              help="Messages of the recording the replay scenario generates. "
              f"[default: 1,000,000; {QUICK_REPLAY_MESSAGES:,} with --quick]")
@click.option("--audit-rows", type=click.IntRange(min=1),
              help="Verdicts the audit-sql scenario generates. "
              f"[default: 10,000,000; {QUICK_AUDIT_ROWS:,} with --quick]")
@click.option("--audit-tail", type=click.IntRange(min=0),
              help="Of the audit-sql verdicts, how many are still in the message log (not converted to Parquet), "
              "which every query decodes when it opens. [default: half a segment, what a running appliance "
              "has on average; 0: none]")
@click.option("--audit-segment-bytes", type=click.IntRange(min=64 << 10),
              help="The audit.segment_bytes the audit-sql layout models: a Parquet file per segment, half a segment "
              "not converted. [default: 16 MiB, the setting's default]")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Also write medians, ratios and every raw run to this file, and a PNG chart next to it (with matplotlib).")
@click.option("--verdict", is_flag=True,
              help="Only measure the cost of one verdict (governance check on the demo schemas and the Avro and Sparkplug B example sets, one core, no sockets).")
def bench(quick: bool, runs: int | None, messages: int | None, warmup: bool | None, scenarios: tuple[str, ...],
          qos: tuple[str, ...], loads: tuple[str, ...], rate: float, duration: float | None, workdir: Path | None,
          replay_messages: int | None, audit_rows: int | None, audit_tail: int | None,
          audit_segment_bytes: int | None, json_file: Path | None, verdict: bool) -> None:
    """Measure throughput, latency, CPU, memory and disk writes: bare mosquitto, the appliance, the
    full governance path with forwarding, and a mosquitto bridge.

    Demo temperature readings, 10% invalid, from one pipelined publisher or 100 sensors; every run
    is checked message by message (sent = delivered + rejected, rejections counted in the audit
    log) and a run that lost a message is reported as failed. Then, without a broker, replay's rate
    over a generated recording and `appliance audit sql` GROUP BY times over generated verdicts.
    Exits with status 1 if any run failed.
    """
    if verdict:
        _verdict_bench(quick, json_file)
        return
    qos_levels = tuple(int(q) for q in qos) or BenchOptions.qos
    count = messages or (QUICK_MESSAGES if quick else BenchOptions.messages)
    brokers = [name for name in scenarios if name in SCENARIOS]
    if not scenarios:
        chosen, measurements = list(SCENARIOS), list(MEASUREMENTS)
    else:
        chosen = list(dict.fromkeys([REFERENCE, *brokers])) if brokers else []
        measurements = [name for name in MEASUREMENTS if name in scenarios]
    if chosen and count > MAX_MESSAGES_QOS1 and any(q > 0 for q in qos_levels):
        raise click.BadParameter(
            f"at most {MAX_MESSAGES_QOS1:,} with QoS 1 (mosquitto_pub -l stops early once packet ids wrap)",
            param_hint="--messages",
        )
    options = BenchOptions(
        messages=count,
        runs=runs or (QUICK_RUNS if quick else BenchOptions.runs),
        warmup=(not quick) if warmup is None else warmup,
        qos=qos_levels,
        scenarios=chosen,
        loads_=loads or LOAD_KINDS,
        rate=rate,
        duration=duration or (QUICK_DURATION_S if quick else BenchOptions.duration),
        rate_qos=(1,) if quick and not qos else None,
        workdir=workdir,
        measurements=measurements,
        replay_messages=replay_messages or (QUICK_REPLAY_MESSAGES if quick else BenchOptions.replay_messages),
        audit_rows=audit_rows or (QUICK_AUDIT_ROWS if quick else BenchOptions.audit_rows),
        audit_tail=audit_tail,
        audit_segment_bytes=audit_segment_bytes or BenchOptions.audit_segment_bytes,
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        report = run_benchmark(options, progress=_progress, note=lambda text: click.echo(f"  {text}", err=True))
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render_tables(report))
    if json_file is not None:
        json_file.write_text(json.dumps(to_json(report), indent=2) + "\n")
        click.echo(f"\nwrote {json_file}", err=True)
        chart = json_file.with_suffix(".png")
        if write_chart(report, chart):
            click.echo(f"wrote {chart}", err=True)
        else:
            click.echo("no chart: matplotlib is not installed (pip install 'mqtt-governance-appliance[bench]')", err=True)
    if report.failed:
        raise SystemExit(1)


def _verdict_bench(quick: bool, json_file: Path | None) -> None:
    from bench.verdict import measure, measure_audit_recording

    iterations = 2_000 if quick else 20_000
    results = measure(iterations=iterations)
    audit_us = measure_audit_recording(iterations=iterations)
    width = max(len(case.name) for case, _ in results)
    click.echo(f"{'verdict (demo set v1; avro, sparkplug: fixtures/*/v1)':<{width}}  median µs")
    for case, micros in results:
        click.echo(f"{case.name:<{width}}  {micros:9.2f}")
    click.echo(f"{'audit recording on the event loop':<{width}}  {audit_us:9.2f}")
    if json_file is not None:
        document = {"verdict_us": {case.name: micros for case, micros in results}, "audit_recording_us": audit_us}
        json_file.write_text(json.dumps(document, indent=2) + "\n")
