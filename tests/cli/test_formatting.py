"""In-process checks of how the ``bgrid`` commands build messages and describe results."""

import argparse
import dataclasses

from google.longrunning import operations_pb2
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from twisted.internet import task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.cli import options
from bgrid.cli.execute import build_action, build_command, output_symlinks
from bgrid.cli.operations import OperationSummary, format_table
from bgrid.cli.rpc import describe_status
from bgrid.digest import Digest
from bgrid.scheduler import Scheduler

HASH_A = "a" * 64
HASH_B = "b" * 64


def missing_blobs_status(message, digests):
    failure = error_details_pb2.PreconditionFailure()
    for hash_hex, size in digests:
        failure.violations.add(type="MISSING", subject=f"blobs/{hash_hex}/{size}")
    detail = any_pb2.Any()
    detail.Pack(failure)
    return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message, details=[detail])


def execute_arguments(**overrides):
    values = dict(
        command=["/bin/echo", "hi"], working_directory=None, outputs=[], environment=[],
        platform=[], timeout=None, do_not_cache=False,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


class DescribeStatusTests(unittest.TestCase):
    def test_plain_status(self):
        self.assertEqual(describe_status("NOT_FOUND", "no such blob"), "NOT_FOUND: no such blob")

    def test_unnamed_missing_blobs_listed(self):
        status = missing_blobs_status(f"missing blobs: {HASH_A}/1 and 1 more", [(HASH_A, 1), (HASH_B, 2)])

        text = describe_status("FAILED_PRECONDITION", status.message, status)

        self.assertEqual(
            text,
            f"FAILED_PRECONDITION: missing blobs: {HASH_A}/1 and 1 more; missing: blobs/{HASH_B}/2",
        )

    def test_named_missing_blobs_not_repeated(self):
        status = missing_blobs_status(f"missing command: {HASH_A}/1", [(HASH_A, 1)])

        text = describe_status("FAILED_PRECONDITION", status.message, status)

        self.assertEqual(text, f"FAILED_PRECONDITION: missing command: {HASH_A}/1")


class OperationSummaryTests(unittest.TestCase):
    def make_operation(self, stage, response=None):
        operation = operations_pb2.Operation(name="operations/1", done=response is not None)
        operation.metadata.Pack(re_pb2.ExecuteOperationMetadata(
            stage=stage, action_digest=re_pb2.Digest(hash=HASH_A, size_bytes=12)
        ))
        if response is not None:
            operation.response.Pack(response)
        return operation

    def test_running_operation(self):
        summary = OperationSummary.from_operation(self.make_operation(re_pb2.ExecutionStage.EXECUTING))

        self.assertEqual(summary.stage, "EXECUTING")
        self.assertFalse(summary.done)
        self.assertEqual(summary.action_digest, f"{HASH_A}/12")
        self.assertIsNone(summary.status)

    def test_cancelled_operation(self):
        response = re_pb2.ExecuteResponse(
            status=status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled by a user")
        )

        summary = OperationSummary.from_operation(
            self.make_operation(re_pb2.ExecutionStage.COMPLETED, response)
        )

        self.assertTrue(summary.done)
        self.assertEqual(summary.status, "CANCELLED")
        self.assertEqual(summary.message, "cancelled by a user")
        self.assertIsNone(summary.exit_code)

    def test_operation_with_error(self):
        operation = operations_pb2.Operation(name="operations/2", done=True)
        operation.error.CopyFrom(status_pb2.Status(code=code_pb2.INTERNAL, message="lost"))

        summary = OperationSummary.from_operation(operation)

        self.assertEqual(summary.stage, "UNKNOWN")
        self.assertEqual((summary.status, summary.message), ("INTERNAL", "lost"))

    def make_waiting_operation(self, metadata, reason="NO_MATCHING_BOT", domain="bgrid"):
        """Return a queued Operation whose metadata carries an ErrorInfo."""
        operation_metadata = re_pb2.ExecuteOperationMetadata(
            stage=re_pb2.ExecutionStage.QUEUED,
            action_digest=re_pb2.Digest(hash=HASH_A, size_bytes=12),
        )
        info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)
        operation_metadata.partial_execution_metadata.auxiliary_metadata.add().Pack(info)
        operation = operations_pb2.Operation(name="operations/3")
        operation.metadata.Pack(operation_metadata)
        return operation

    def test_waiting_notes(self):
        cases = [
            ({"platform": "OSFamily=windows", "missing": "OSFamily=windows"},
             "no bot matches OSFamily=windows"),
            ({"platform": "OSFamily=windows,cores=8", "missing": "OSFamily=windows"},
             "no bot matches OSFamily=windows,cores=8 (no bot offers OSFamily=windows)"),
            ({"platform": "OSFamily=windows,cores=8"},
             "no bot matches OSFamily=windows,cores=8"),
            ({"platform": ""}, "no bot is connected to this instance"),
        ]
        for metadata, expected in cases:
            with self.subTest(metadata=metadata):
                summary = OperationSummary.from_operation(self.make_waiting_operation(metadata))

                self.assertEqual(summary.waiting, expected)

    def test_other_error_info_ignored(self):
        cases = [("OTHER_REASON", "bgrid"), ("NO_MATCHING_BOT", "example.com")]
        for reason, domain in cases:
            with self.subTest(reason=reason, domain=domain):
                operation = self.make_waiting_operation({"platform": "a=b"}, reason, domain)

                self.assertIsNone(OperationSummary.from_operation(operation).waiting)

    def test_waiting_note_from_scheduler(self):
        scheduler = Scheduler(task.Clock())
        self.addCleanup(scheduler.stop)
        action = re_pb2.Action(
            command_digest=re_pb2.Digest(hash=HASH_A, size_bytes=1),
            input_root_digest=re_pb2.Digest(hash=HASH_B, size_bytes=2),
        )
        digest = Digest.of(action.SerializeToString())
        name = scheduler.submit("", digest, action, platform=[("OSFamily", "windows")])

        summary = OperationSummary.from_operation(scheduler.get_operation(name))

        self.assertEqual(summary.waiting, "no bot matches OSFamily=windows")
        self.assertEqual(summary.stage, "QUEUED")
        self.assertEqual(
            dataclasses.asdict(summary)["waiting"], "no bot matches OSFamily=windows"
        )

    def test_table_waiting_line(self):
        summaries = [
            OperationSummary("operations/queued", "QUEUED", False, f"{HASH_A}/1",
                             waiting="no bot matches OSFamily=windows"),
            OperationSummary("operations/done", "COMPLETED", True, f"{HASH_B}/2", status="OK"),
        ]

        lines = format_table(summaries).splitlines()

        self.assertEqual(len(lines), 4)
        self.assertEqual(lines[1].split()[:2], ["operations/queued", "QUEUED"])
        self.assertEqual(lines[2], "  waiting: no bot matches OSFamily=windows")
        self.assertEqual(lines[3].split()[:2], ["operations/done", "COMPLETED"])

    def test_table_columns_align(self):
        summaries = [
            OperationSummary("operations/short", "QUEUED", False, f"{HASH_A}/1"),
            OperationSummary("operations/a-longer-name", "COMPLETED", True, f"{HASH_B}/2", status="OK"),
        ]

        lines = format_table(summaries).splitlines()

        self.assertEqual(len(lines), 3)
        digest_column = lines[0].index("ACTION DIGEST")
        self.assertEqual(lines[1].index(HASH_A), digest_column)
        self.assertEqual(lines[2].index(HASH_B), digest_column)
        self.assertEqual(lines[1].split(), ["operations/short", "QUEUED", "no", "-", f"{HASH_A}/1"])


class BuildMessagesTests(unittest.TestCase):
    def test_command_lists_sorted(self):
        args = execute_arguments(
            outputs=["z.txt", "a/b.txt"],
            environment=[("PATH", "/bin"), ("HOME", "/tmp")],
            platform=[("OSFamily", "linux"), ("Arch", "x86_64"), ("Arch", "amd64")],
        )

        command = build_command(args)

        self.assertEqual(list(command.output_paths), ["a/b.txt", "z.txt"])
        self.assertEqual([variable.name for variable in command.environment_variables], ["HOME", "PATH"])
        self.assertEqual(
            [(prop.name, prop.value) for prop in command.platform.properties],
            [("Arch", "amd64"), ("Arch", "x86_64"), ("OSFamily", "linux")],
        )
        self.assertEqual(command.working_directory, "")

    def test_action_fields(self):
        args = execute_arguments(
            timeout=options.positive_duration("2.5"), do_not_cache=True,
            platform=[("OSFamily", "linux")],
        )
        command = build_command(args)

        action = build_action(args, Digest(HASH_A, 10), Digest(HASH_B, 20), command)

        self.assertEqual(action.command_digest.hash, HASH_A)
        self.assertEqual(action.input_root_digest.size_bytes, 20)
        self.assertEqual((action.timeout.seconds, action.timeout.nanos), (2, 500_000_000))
        self.assertTrue(action.do_not_cache)
        self.assertEqual(action.platform, command.platform)

    def test_timeout_rounded_to_nanoseconds(self):
        cases = [
            ("0.000000001", (0, 1)),
            ("0.0000000006", (0, 1)),
            ("1.0000000004", (1, 0)),
            ("1.9999999996", (2, 0)),
            ("315576000000", (315_576_000_000, 0)),
        ]
        for text, expected in cases:
            with self.subTest(timeout=text):
                args = execute_arguments(timeout=options.positive_duration(text))

                action = build_action(args, Digest(HASH_A, 10), Digest(HASH_B, 20), build_command(args))

                self.assertEqual((action.timeout.seconds, action.timeout.nanos), expected)

    def test_output_symlinks_from_every_field(self):
        result = re_pb2.ActionResult(
            output_symlinks=[re_pb2.OutputSymlink(path="link", target="file")],
            output_file_symlinks=[re_pb2.OutputSymlink(path="link", target="file")],
            output_directory_symlinks=[re_pb2.OutputSymlink(path="dir-link", target="dir")],
        )

        self.assertEqual(output_symlinks(result), {"link": "file", "dir-link": "dir"})
