"""Smoke runs of ``python -m bench.scale --smoke`` and a short ``python -m bench.soak``.

They check that the tools, the bulk loader and bgrid work together, not how fast they are.
"""

from twisted.trial import unittest

from bench.scale import SMOKE_BLOB_COUNTS, SMOKE_QUEUED_COUNTS
from tests.bench import support

# Seconds one run may take. On 2 cores the scale smoke run needs about 10, the soak run 15.
RUN_TIMEOUT_SECONDS = 90


def run_tool(module, *arguments):
    """Run ``python -m module arguments`` and return its JSON records and its stderr."""
    return support.run_tool(module, *arguments, timeout=RUN_TIMEOUT_SECONDS)


class ScaleSmokeTest(unittest.TestCase):
    timeout = RUN_TIMEOUT_SECONDS + 10

    def test_every_step_measured(self):
        records, stderr = run_tool("bench.scale", "--smoke")

        expected = []
        for blob_count in SMOKE_BLOB_COUNTS:
            expected += [
                ("load", blob_count, 0),
                ("fmb 1000 digests", blob_count, 0),
                ("exec 1 client", blob_count, 0),
            ]
        expected += [("exec 1 client", SMOKE_BLOB_COUNTS[-1], queued) for queued in SMOKE_QUEUED_COUNTS]
        steps = [(record["case"], record["blobs"], record["queued_jobs"]) for record in records]
        self.assertEqual(steps, expected, f"stderr:\n{stderr[-3000:]}")
        for record in records:
            if record["case"] == "load":
                continue
            label = f"{record['case']} at {record['blobs']} blobs, {record['queued_jobs']} queued"
            self.assertGreater(record["ops"], 0, f"{label}: no operation: {record}")
            self.assertEqual(record["errors"], 0, f"{label}: failed operations: {record}")
            self.assertGreater(record["server_rss_anon_mib"], 0, f"{label}: no memory: {record}")
        fmb = [record for record in records if record["case"].startswith("fmb")]
        self.assertTrue(all(record["us_per_digest"] > 0 for record in fmb), fmb)


class SoakSmokeTest(unittest.TestCase):
    timeout = RUN_TIMEOUT_SECONDS + 10

    def test_memory_read_in_every_phase(self):
        records, stderr = run_tool(
            "bench.soak", "--rounds", "1", "--seconds", "1", "--clients", "2",
            "--operation-retention", "1", "--settle", "1",
        )

        phases = [record["phase"] for record in records]
        self.assertEqual(phases, ["start", "after load", "after retention"], stderr[-3000:])
        self.assertGreater(records[1]["ops"], 0, records[1])
        self.assertEqual(records[1]["errors"], 0, records[1])
        for record in records:
            self.assertGreater(record["rss_anon_mib"], 0, record)
