"""Smoke runs of ``python -m bench --smoke``: every scenario prints a sound JSON record.

They check that the tool and the servers work together, not how fast they are.
"""

import importlib.util

from twisted.trial import unittest

from tests.bench import support

# The Bazel build takes minutes and --smoke skips it, so it is left out here.
SMOKE_SCENARIOS = ["fmb", "batch-update", "batch-read", "bs-write", "bs-read", "ac", "exec"]

# The scenario cases each smoke run prints, in order.
EXPECTED_CASES = [
    ("fmb", "1000 digests"),
    ("batch-update", "100 x 4 KiB"),
    ("batch-read", "100 x 4 KiB"),
    ("bs-write", "64 MiB x1"),
    ("bs-write", "1 MiB x4"),
    ("bs-write", "64 MiB x20"),
    ("bs-read", "64 MiB x1"),
    ("bs-read", "1 MiB x4"),
    ("ac", "update"),
    ("ac", "get hit"),
    ("exec", "1 client"),
    ("exec", "16 clients"),
    ("exec", "32 clients"),
]

RECORD_KEYS = [
    "scenario", "case", "server", "ops", "errors", "seconds", "ops_per_s", "mb_per_s",
    "p50_ms", "p99_ms", "server_cpu_s_per_op", "server_peak_rss_mib", "client_cpu_s_per_op",
]

# Seconds one smoke run may take. On 2 cores the null server needs about 15, bgrid about 20.
RUN_TIMEOUT_SECONDS = 110


def run_smoke(preset):
    """Run the benchmark in --smoke mode on ``preset`` and return (records, stderr)."""
    return support.run_tool(
        "bench", "--smoke", "--preset", preset, "--scenario", ",".join(SMOKE_SCENARIOS),
        timeout=RUN_TIMEOUT_SECONDS,
    )


class SmokeTest(unittest.TestCase):
    timeout = RUN_TIMEOUT_SECONDS + 10

    def assert_sound_records(self, records, server, stderr):
        cases = [(record.get("scenario"), record.get("case")) for record in records]
        self.assertEqual(cases, EXPECTED_CASES, f"records: {records}\nstderr:\n{stderr[-3000:]}")
        for record in records:
            label = f"{record['scenario']} ({record['case']}) on {server}"
            missing = [key for key in RECORD_KEYS if key not in record]
            self.assertEqual(missing, [], f"{label}: record lacks {missing}: {record}")
            self.assertEqual(record["server"], server)
            self.assertNotIn("error", record, f"{label} failed: {record}")
            self.assertGreater(record["ops"], 0, f"{label} did no operation: {record}")
            self.assertEqual(record["errors"], 0, f"{label} had failed operations: {record}")
            self.assertGreater(record["server_peak_rss_mib"], 0, f"{label}: no memory sample: {record}")
            if record["scenario"] in ("batch-update", "batch-read", "bs-write", "bs-read"):
                self.assertGreater(record["mb_per_s"], 0, f"{label}: no MB/s: {record}")
            if record["scenario"] == "exec":
                self.assertEqual(record["bot_errors"], 0, f"{label}: the no-op bots failed: {record}")

    def test_null_server(self):
        records, stderr = run_smoke("null")

        self.assert_sound_records(records, "null", stderr)

    def test_bgrid(self):
        if importlib.util.find_spec("bgrid.tap") is None:
            raise unittest.SkipTest("bgrid.tap does not exist yet, so there is no bgrid server to start")

        records, stderr = run_smoke("bgrid")

        start_failures = [record for record in records if "error" in record and "case" not in record]
        if records and len(start_failures) == len(records):
            raise unittest.SkipTest(f"the bgrid server does not start: {start_failures[0]['error']}")
        self.assert_sound_records(records, "bgrid", stderr)
