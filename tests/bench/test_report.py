"""Tests of ``bench.report``: the Markdown tables made from benchmark records."""

import json

from twisted.trial import unittest

from bench import report
from tests.util import make_temp_dir

RECORDS = [
    {"scenario": "fmb", "case": "1000 digests", "server": "null", "ops_per_s": 2000.0,
     "mb_per_s": None, "p50_ms": 3.5, "server_cpu_s_per_op": 0.0005, "server_peak_rss_mib": 51.4},
    {"scenario": "fmb", "case": "1000 digests", "server": "bgrid", "ops_per_s": 600.0,
     "mb_per_s": None, "p50_ms": 13.0, "server_cpu_s_per_op": 0.0018, "server_peak_rss_mib": 105.3},
    {"scenario": "fmb", "case": "1000 digests", "server": "buildgrid", "ops_per_s": 150.0,
     "mb_per_s": None, "p50_ms": 57.0, "server_cpu_s_per_op": 0.0074, "server_peak_rss_mib": 165.0},
    {"scenario": "build", "server": "null", "skipped": "the null server gives bots no work"},
    {"scenario": "build", "case": "clean", "server": "bgrid", "ops_per_s": 6.3, "wall_s": 4.4,
     "server_cpu_s_per_op": 0.0257, "server_peak_rss_mib": 90.9},
]


class ReportTests(unittest.TestCase):
    def test_tables_from_results_file(self):
        path = f"{make_temp_dir(self)}/results.jsonl"
        with open(path, "w", encoding="utf-8") as results:
            results.write("\n".join(json.dumps(record) for record in RECORDS) + "\n\n")

        servers, cases = report.group(report.load(path))
        throughput = report.markdown(report.throughput_table(servers, cases)).splitlines()
        detail = report.markdown(report.detail_table(servers, cases)).splitlines()

        self.assertEqual(servers, ["null", "bgrid", "buildgrid"])
        self.assertEqual(
            throughput[0],
            "| scenario | case | null | bgrid | BuildGrid 0.4.4 | bgrid / null | bgrid / BuildGrid |",
        )
        self.assertEqual(throughput[2], "| `fmb` | 1000 digests | 2,000 | 600 | 150 | 30% | 4.0x |")
        self.assertEqual(throughput[3], "| `build` | clean | - | 4.4 s | - | - | - |")
        self.assertEqual(
            detail[2],
            "| `fmb` | 1000 digests | 3.50 ms / 0.50 ms / 51 MiB | 13.00 ms / 1.80 ms / 105 MiB "
            "| 57.00 ms / 7.40 ms / 165 MiB |",
        )
