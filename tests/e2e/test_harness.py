"""Tests for the parts of the e2e harness that need neither Bazel nor a daemon."""

import os

from twisted.trial import unittest

from tests.e2e import harness
from tests.util import make_temp_dir


class ParseProcessSummaryTest(unittest.TestCase):
    def test_local_build(self):
        output = "INFO: Elapsed time: 9.351s\nINFO: 56 processes: 28 internal, 28 linux-sandbox.\n"

        summary = harness.parse_process_summary(output)

        self.assertEqual(summary, {"total": 56, "internal": 28, "linux-sandbox": 28})
        self.assertEqual(harness.spawn_counts(summary), {"linux-sandbox": 28})

    def test_strategy_with_spaces(self):
        summary = harness.parse_process_summary("INFO: 40 processes: 12 internal, 28 remote cache hit.\n")

        self.assertEqual(harness.spawn_counts(summary), {"remote cache hit": 28})

    def test_singular_and_empty(self):
        self.assertEqual(harness.parse_process_summary("INFO: 1 process: 1 internal.\n"), {"total": 1, "internal": 1})
        self.assertEqual(harness.parse_process_summary("INFO: 0 processes.\n"), {"total": 0})

    def test_last_summary_wins(self):
        output = "INFO: 3 processes: 3 remote.\nINFO: 5 processes: 5 remote cache hit.\n"

        self.assertEqual(harness.parse_process_summary(output), {"total": 5, "remote cache hit": 5})

    def test_missing_summary_raises(self):
        self.assertRaises(ValueError, harness.parse_process_summary, "ERROR: build failed\n")


class SnapshotOutputsTest(unittest.TestCase):
    def test_files_modes_and_symlinks(self):
        directory = make_temp_dir(self)
        os.makedirs(os.path.join(directory, "nested"))
        with open(os.path.join(directory, "nested", "empty"), "wb"):
            pass
        tool = os.path.join(directory, "tool")
        with open(tool, "wb") as stream:
            stream.write(b"#!/bin/sh\n")
        os.chmod(tool, 0o755)
        os.symlink("tool", os.path.join(directory, "link"))

        snapshot = harness.snapshot_outputs(directory)

        self.assertEqual(
            snapshot["nested/empty"],
            "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855, not executable",
        )
        self.assertTrue(snapshot["tool"].endswith(", executable"))
        self.assertEqual(snapshot["link"], "symlink to tool")
        self.assertNotIn("nested", snapshot)
