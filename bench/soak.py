"""The soak benchmark of bgrid: does its memory return after long Execute load?

``python -m bench.soak`` starts bgrid with a short ``--operation-retention`` and runs
rounds of the ``exec`` load of ``python -m bench`` (new actions from 32 clients, with as
many no-op bots). After each round it waits until every done operation has expired. It
prints one JSON line at the start and one after each round and each wait, with the
daemon's resident memory from ``/proc/PID/status``:

- ``rss_mib``: VmRSS, everything resident.
- ``rss_anon_mib``: RssAnon, the heap and other anonymous memory. It contains the
  scheduler's records, and it grows if anything leaks.
- ``rss_file_mib``: RssFile, mostly pages of the LMDB file, which grows with the stored
  data and which the kernel may drop at any time.

Done operations stay in memory until their retention period ends, so with bgrid's default
of an hour the anonymous memory grows with the operations of the last hour. The short
retention here shows what is left once they are gone.
"""

import argparse
import asyncio
import json
import sys
import time

import grpc

from bench import execution
from bench.load import Settings, run_closed_loop
from bench.procstat import ProcessTreeMonitor, memory_kib
from bench.scenarios import Bench
from bench.servers import CHANNEL_OPTIONS, PRESETS, Server, ServerSpec, ServerStartError
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc

DEFAULT_ROUNDS = 2
DEFAULT_ROUND_SECONDS = 120.0
DEFAULT_CLIENTS = 32
DEFAULT_RETENTION_SECONDS = 30.0
# Seconds waited after the retention period, so that the expiry timer has run and the
# CAS has flushed its access times (every 60 seconds).
DEFAULT_SETTLE_SECONDS = 65.0


def memory_record(pid, phase, **fields):
    """Return the JSON record of the daemon's memory now."""
    record = {"scenario": "soak", "phase": phase}
    record.update(fields)
    for name, field in [("rss_mib", "VmRSS"), ("rss_anon_mib", "RssAnon"), ("rss_file_mib", "RssFile")]:
        record[name] = round(memory_kib(pid, field) / 1024, 1)
    return record


def soak_server_spec(retention_seconds):
    """Return the bgrid preset with ``--operation-retention`` set."""
    preset = PRESETS["bgrid"]
    return ServerSpec(
        name=preset.name,
        command=f"{preset.command} --operation-retention {retention_seconds:g}",
    )


async def soak(rounds, round_seconds, clients, retention_seconds, settle_seconds):
    server = Server(soak_server_spec(retention_seconds))
    try:
        await server.start()
        pid = server.process.pid
        print(json.dumps(memory_record(pid, "start")), flush=True)
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            bench = Bench(server, ProcessTreeMonitor(pid), Settings(), channel)
            stub = remote_execution_pb2_grpc.ExecutionStub(channel)
            for round_number in range(1, rounds + 1):
                label = bench.blobs.make_text(f"bench-soak-r{round_number}")
                async with execution.running_bots(server.address, "", clients, label):
                    stats, seconds = await run_closed_loop(
                        lambda caller: execution.execute_new_action(bench, stub),
                        clients,
                        round_seconds,
                    )
                print(json.dumps(memory_record(
                    pid, "after load", round=round_number, ops=stats.ops, errors=stats.errors,
                    ops_per_s=round(stats.ops / seconds, 2) if seconds > 0 else None,
                )), flush=True)
                started = time.monotonic()
                await asyncio.sleep(retention_seconds + settle_seconds)
                print(json.dumps(memory_record(
                    pid, "after retention", round=round_number,
                    idle_seconds=round(time.monotonic() - started, 1),
                )), flush=True)
    finally:
        for problem in server.stop():
            print(f"bench.soak: {problem}", file=sys.stderr, flush=True)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=(
            "Run rounds of Execute load against bgrid and print its resident memory at the "
            "start, after each round, and once the round's operations have expired."
        ),
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
        help=f"rounds of load (default: {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_ROUND_SECONDS, metavar="SECONDS",
        help=f"seconds of load in each round (default: {DEFAULT_ROUND_SECONDS:g})",
    )
    parser.add_argument(
        "--clients", type=int, default=DEFAULT_CLIENTS, metavar="N",
        help=f"concurrent clients, each with a no-op bot (default: {DEFAULT_CLIENTS})",
    )
    parser.add_argument(
        "--operation-retention", type=float, default=DEFAULT_RETENTION_SECONDS,
        metavar="SECONDS",
        help="the daemon's --operation-retention: seconds a done operation is kept "
             f"(default: {DEFAULT_RETENTION_SECONDS:g})",
    )
    parser.add_argument(
        "--settle", type=float, default=DEFAULT_SETTLE_SECONDS, metavar="SECONDS",
        help="seconds waited after the retention period before memory is read again "
             f"(default: {DEFAULT_SETTLE_SECONDS:g}, just over the CAS's 60-second flush of "
             "access times)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for option, value in [("--rounds", args.rounds), ("--clients", args.clients)]:
        if value < 1:
            build_parser().error(f"{option} must be at least 1, got {value}")
    for option, value in [("--seconds", args.seconds), ("--operation-retention", args.operation_retention)]:
        if not value > 0:
            build_parser().error(f"{option} must be positive, got {value}")
    if args.settle < 0:
        build_parser().error(f"--settle must not be negative, got {args.settle}")
    try:
        asyncio.run(soak(
            args.rounds, args.seconds, args.clients, args.operation_retention, args.settle
        ))
    except ServerStartError as error:
        print(f"bench.soak: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("bench.soak: interrupted, after stopping bgrid", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
