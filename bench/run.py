"""The ``python -m bench`` command: start each server, run the scenarios, print JSON lines.

For each scenario the servers take turns. Each one is started fresh (new temporary
directory, new port), runs the scenario's cases and is stopped by pid before the next
one starts. A comparison between servers thus comes from one run on one machine. Each case
prints one JSON object on a line of standard output; progress and server logs of
failures go to standard error.
"""

import argparse
import asyncio
import json
import math
import sys

import grpc

from bench import bazel, execution, scenarios
from bench.procstat import ProcessTreeMonitor
from bench.servers import (
    CHANNEL_OPTIONS,
    PRESET_GROUPS,
    PRESETS,
    Server,
    ServerStartError,
    expand_presets,
    parse_server_spec,
)
from bench.load import Settings

SCENARIOS = {
    "fmb": scenarios.find_missing_blobs,
    "batch-update": scenarios.batch_update,
    "batch-read": scenarios.batch_read,
    "bs-write": scenarios.bytestream_write,
    "bs-read": scenarios.bytestream_read,
    "ac": scenarios.action_cache,
    "exec": execution.execute,
    "build": bazel.build,
}

# Checks that raise bazel.ScenarioSkipped before a server is started for nothing.
PRECONDITIONS = {"build": bazel.check_preconditions}

# Seconds between samples of the server's memory.
SAMPLE_INTERVAL_SECONDS = 0.1

# Measured seconds of each case in --smoke mode.
SMOKE_DURATION_SECONDS = 0.2

DEFAULT_DURATION_SECONDS = 10.0
DEFAULT_WARMUP_SECONDS = 1.0


def build_parser():
    presets = ", ".join([*PRESETS, *PRESET_GROUPS])
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark REAPI servers with the same load and print one JSON line per scenario "
            "case and server."
        ),
        epilog=(
            "Example: python -m bench --preset all. A server description is "
            "name=NAME,cmd=COMMAND[,bot=COMMAND][,cleanup=COMMAND]. Commands may use {port}, "
            "{tmp}, {repo} and {python}. Two more tools measure bgrid alone: "
            "python -m bench.scale (FindMissingBlobs and Execute with up to 10 million "
            "blobs in the CAS and 10,000 queued jobs) and python -m bench.soak (resident "
            "memory after rounds of Execute load); each takes --help."
        ),
    )

    parser.add_argument(
        "--preset", action="append", default=[], metavar="NAMES",
        help=f"comma-separated preset servers to run: {presets} (repeatable)",
    )
    parser.add_argument(
        "--server", action="append", default=[], metavar="DESCRIPTION",
        help="a server to start from a command line, described below (repeatable)",
    )

    parser.add_argument(
        "--scenario", action="append", default=[], metavar="NAMES",
        help=f"comma-separated scenarios to run (default: all, in this order: {', '.join(SCENARIOS)})",
    )

    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help=f"measured seconds of each case (default: {DEFAULT_DURATION_SECONDS:g}, or no limit "
             "when --requests is given)",
    )
    parser.add_argument(
        "--requests", type=int, default=None, metavar="N",
        help="stop each case after N operations (default: no limit)",
    )
    parser.add_argument(
        "--warmup", type=float, default=None, metavar="SECONDS",
        help="unmeasured seconds of load before each case (default: 1, 0 with --smoke)",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help=f"check that every scenario works: {SMOKE_DURATION_SECONDS:g} s a case, no warmup, "
             "no Bazel build",
    )

    parser.add_argument(
        "--instance", default="", metavar="NAME",
        help="REAPI instance name to send (default: the empty name)",
    )
    parser.add_argument(
        "--keep", action="store_true",
        help="keep each server's temporary directory and logs, and print where they are",
    )

    return parser


def split_names(values):
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def parse_arguments(argv):
    """Return (server specs, scenario names, Settings, keep) or exit with a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        specs = expand_presets(split_names(args.preset))
        specs += [parse_server_spec(text) for text in args.server]
    except ValueError as error:
        parser.error(str(error))
    if not specs:
        parser.error("no server to benchmark: give --preset (for example --preset all) or --server")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        parser.error(f"server names must differ, got {', '.join(names)}")

    scenario_names = split_names(args.scenario) or list(SCENARIOS)
    unknown = [name for name in scenario_names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: expected some of {', '.join(SCENARIOS)}")

    if args.requests is not None and args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    if args.duration is not None and args.duration <= 0:
        parser.error(f"--duration must be positive, got {args.duration}")
    if args.smoke:
        duration = SMOKE_DURATION_SECONDS
    elif args.duration is not None:
        duration = args.duration
    elif args.requests is not None:
        duration = math.inf
    else:
        duration = DEFAULT_DURATION_SECONDS
    if args.warmup is not None:
        warmup = args.warmup
    elif args.smoke:
        warmup = 0.0
    else:
        warmup = DEFAULT_WARMUP_SECONDS

    settings = Settings(
        duration=duration,
        max_requests=args.requests,
        warmup=warmup,
        smoke=args.smoke,
        instance_name=args.instance,
    )
    return specs, scenario_names, settings, args.keep


def progress(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def sample_until_cancelled(monitor):
    while True:
        monitor.sample()
        await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)


def failure_record(scenario, server_name, key, message):
    """Return the record of a scenario that failed (key "error") or was skipped ("skipped")."""
    return {"scenario": scenario, "server": server_name, key: message}


async def run_scenario(spec, scenario, settings, keep):
    """Start a server from ``spec``, run one scenario on it, stop it, and return the records."""
    if scenario in PRECONDITIONS:
        try:
            PRECONDITIONS[scenario](spec, settings)
        except bazel.ScenarioSkipped as skipped:
            progress(f"skipped {scenario} on {spec.name}: {skipped}")
            return [failure_record(scenario, spec.name, "skipped", str(skipped))]

    server = Server(spec, keep_directory=keep)
    progress(f"starting {spec.name} for {scenario}")
    try:
        try:
            await server.start()
        except ServerStartError as error:
            progress(str(error))
            return [failure_record(scenario, spec.name, "error", str(error).splitlines()[0])]
        records = await measure_scenario(server, scenario, settings)
    finally:
        if keep and server.directory:
            progress(f"kept {spec.name}'s directory {server.directory}")
        for problem in server.stop():
            progress(problem)
    return records


async def measure_scenario(server, scenario, settings):
    """Run one scenario on a started server, sampling its memory, and return the records."""
    name = server.spec.name
    monitor = ProcessTreeMonitor(server.process.pid)
    sampler = asyncio.ensure_future(sample_until_cancelled(monitor))
    try:
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            bench = scenarios.Bench(server, monitor, settings, channel)
            records = await SCENARIOS[scenario](bench)
    except bazel.ScenarioSkipped as skipped:
        progress(f"skipped {scenario} on {name}: {skipped}")
        records = [failure_record(scenario, name, "skipped", str(skipped))]
    except (scenarios.SetupError, grpc.aio.AioRpcError, RuntimeError) as error:
        if isinstance(error, grpc.aio.AioRpcError):
            message = f"{error.code().name}: {error.details()}"
        else:
            message = str(error)
        progress(f"{scenario} failed on {name}: {message}\nServer output:\n{server.log_tail()}")
        records = [failure_record(scenario, name, "error", message)]
    finally:
        sampler.cancel()

    if not server.process.is_running():
        message = f"server {name} exited with status {server.process.popen.returncode} during {scenario}"
        progress(f"{message}. Its output:\n{server.log_tail()}")
        for record in records:
            record.setdefault("error", message)
    return records


async def run(specs, scenario_names, settings, keep):
    for scenario in scenario_names:
        for spec in specs:
            for record in await run_scenario(spec, scenario, settings, keep):
                print(json.dumps(record), flush=True)


def main(argv=None):
    specs, scenario_names, settings, keep = parse_arguments(argv)
    try:
        asyncio.run(run(specs, scenario_names, settings, keep))
    except KeyboardInterrupt:
        progress("interrupted, after stopping the running server")
        return 130
    return 0
