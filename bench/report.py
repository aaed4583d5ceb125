"""Turn the JSON lines of ``python -m bench`` into the Markdown tables of docs/benchmarks.md.

``python -m bench.report RESULTS.jsonl`` prints one table of throughput and one of
latency, CPU and memory, with a column per server in the order the servers first appear,
and the ratios of bgrid to the null server and to BuildGrid where both ran.
"""

import argparse
import json
import sys

# Server names as the presets of ``bench.servers`` print them, and their column titles.
TITLES = {"null": "null", "bgrid": "bgrid", "buildgrid": "BuildGrid 0.4.4"}


def load(path):
    """Return the records of a results file, skipping blank lines."""
    with open(path, encoding="utf-8") as results:
        return [json.loads(line) for line in results if line.strip()]


def group(records):
    """Return ``(servers, cases)``: the server names in order of appearance, and
    ``{(scenario, case): {server: record}}`` in order of appearance."""
    servers = []
    cases = {}
    for record in records:
        server = record["server"]
        if server not in servers:
            servers.append(server)
        if "case" not in record:
            continue
        cases.setdefault((record["scenario"], record["case"]), {})[server] = record
    return servers, cases


def number(value, digits=1):
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def throughput(record):
    """Return a record's throughput cell: ops/s, with MB/s for data scenarios, or why
    there is none."""
    if record is None:
        return "-"
    if "error" in record:
        return "failed"
    if "wall_s" in record:
        return f"{record['wall_s']:.1f} s"
    cell = number(record.get("ops_per_s"))
    if record.get("mb_per_s"):
        cell += f" ({number(record['mb_per_s'])} MB/s)"
    if record.get("errors"):
        cell += f", {record['errors']} errors"
    return cell


def ratio(numerator, denominator, percent):
    values = [record and record.get("ops_per_s") for record in (numerator, denominator)]
    if not all(values):
        return "-"
    value = values[0] / values[1]
    return f"{100 * value:.0f}%" if percent else f"{value:.1f}x"


def throughput_table(servers, cases):
    header = ["scenario", "case"] + [TITLES.get(server, server) for server in servers]
    header += ["bgrid / null", "bgrid / BuildGrid"]
    lines = [header, ["---"] * len(header)]
    for (scenario, case), by_server in cases.items():
        row = [f"`{scenario}`", case]
        row += [throughput(by_server.get(server)) for server in servers]
        bgrid = by_server.get("bgrid")
        row.append(ratio(bgrid, by_server.get("null"), percent=True))
        row.append(ratio(bgrid, by_server.get("buildgrid"), percent=False))
        lines.append(row)
    return lines


def detail(record):
    if record is None or "error" in record:
        return "-"
    p50 = record.get("p50_ms")
    cpu = record.get("server_cpu_s_per_op")
    latency = "-" if p50 is None else f"{number(p50, 2)} ms"
    cpu_ms = "-" if cpu is None else f"{number(cpu * 1000, 2)} ms"
    return f"{latency} / {cpu_ms} / {number(record.get('server_peak_rss_mib'), 0)} MiB"


def detail_table(servers, cases):
    header = ["scenario", "case"] + [TITLES.get(server, server) for server in servers]
    lines = [header, ["---"] * len(header)]
    for (scenario, case), by_server in cases.items():
        lines.append([f"`{scenario}`", case] + [detail(by_server.get(server)) for server in servers])
    return lines


def markdown(lines):
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Print the results of python -m bench as Markdown tables.",
    )
    parser.add_argument("results", help="file of JSON lines that python -m bench printed")
    args = parser.parse_args(argv)
    servers, cases = group(load(args.results))
    sys.stdout.write("Throughput in operations per second (for `build`, wall time):\n\n")
    sys.stdout.write(markdown(throughput_table(servers, cases)) + "\n\n")
    sys.stdout.write("p50 latency / server CPU per operation / server peak RSS:\n\n")
    sys.stdout.write(markdown(detail_table(servers, cases)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
