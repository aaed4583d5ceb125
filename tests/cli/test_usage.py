"""The ``bgrid`` command line with invalid input and without a server: exit status 2 for a
bad command line, 1 for an unreachable server, one message line and no traceback."""

import os

from twisted.trial import unittest

from tests.cli.support import CliAssertions, run_bgrid
from tests.e2e.harness import find_free_port
from tests.util import make_temp_dir

VALID_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/0"

SUBCOMMANDS = [
    ("bot",),
    ("cas",),
    ("cas", "upload"),
    ("cas", "download"),
    ("execute",),
    ("action-cache",),
    ("action-cache", "get"),
    ("operations",),
    ("operations", "list"),
    ("operations", "get"),
    ("operations", "cancel"),
    ("capabilities",),
]


class UsageTests(CliAssertions, unittest.TestCase):
    def setUp(self):
        self.directory = make_temp_dir(self, prefix="bgrid-cli-")
        # A port that nothing listens on, so that a command that got past its argument
        # checks fails with UNAVAILABLE instead of reaching a server.
        self.unused_server = ["--server", f"127.0.0.1:{find_free_port()}"]

    def bgrid(self, *arguments):
        return run_bgrid(*arguments, cwd=self.directory)

    def test_help_of_every_subcommand(self):
        for words in SUBCOMMANDS:
            result = self.bgrid(*words, "--help")
            self.assert_exit_status(result, 0)
            self.assertIn(f"usage: bgrid {' '.join(words)}", result.stdout.decode())

    def test_help_names_units(self):
        execute_help = self.bgrid("execute", "--help").stdout.decode()
        self.assertIn("--timeout SECONDS", execute_help)
        download_help = self.bgrid("cas", "download", "--help").stdout.decode()
        self.assertIn("size in bytes", download_help)

    def test_no_subcommand(self):
        self.assert_usage_error(self.bgrid(), "required: COMMAND")

    def test_unknown_subcommand(self):
        self.assert_usage_error(self.bgrid("frobnicate"), "invalid choice: 'frobnicate'")

    def test_unknown_option(self):
        self.assert_usage_error(
            self.bgrid("capabilities", "--colour"), "unrecognized arguments: --colour"
        )

    def test_malformed_digest(self):
        cases = [
            ("abc", "expected HASH/SIZE"),
            ("xyz/5", "invalid SHA-256 hash 'xyz'"),
            ("E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855/0", "lowercase hex"),
            (VALID_DIGEST.replace("/0", "/-1"), "invalid size '-1'"),
            (VALID_DIGEST.replace("/0", "/ten"), "invalid size 'ten'"),
            (VALID_DIGEST.replace("/0", "/9223372036854775808"),
             "above the int64 maximum 9223372036854775807"),
        ]
        for text, fragment in cases:
            with self.subTest(digest=text):
                self.assert_usage_error(
                    self.bgrid("cas", "download", *self.unused_server, text, "out"),
                    "argument DIGEST", fragment,
                )
                self.assert_usage_error(
                    self.bgrid("action-cache", "get", *self.unused_server, text),
                    "argument ACTION_DIGEST", fragment,
                )
                self.assert_usage_error(
                    self.bgrid("execute", *self.unused_server, "--action", text),
                    "argument --action", fragment,
                )

    def test_bad_platform_property(self):
        for value in ["OSFamily", "=linux"]:
            with self.subTest(value=value):
                result = self.bgrid("execute", *self.unused_server, "--platform", value, "--", "true")
                self.assert_usage_error(result, "argument --platform", "expected NAME=VALUE")

    def test_bad_environment_variable(self):
        result = self.bgrid("execute", *self.unused_server, "--env", "NOVALUE", "--", "true")
        self.assert_usage_error(result, "argument --env", "expected NAME=VALUE")

        result = self.bgrid(
            "execute", *self.unused_server, "--env", "A=1", "--env", "A=2", "--", "true"
        )
        self.assert_usage_error(result, "--env", "'A' is set more than once")

    def test_bad_timeout(self):
        for value in ["0", "-5", "soon", "nan", "inf"]:
            with self.subTest(value=value):
                result = self.bgrid("execute", *self.unused_server, "--timeout", value, "--", "true")
                self.assert_usage_error(result, "argument --timeout", "seconds greater than 0")

    def test_timeout_beyond_duration_range(self):
        for value in ["1e300", "315576000000.000000001", "99999999999999999999"]:
            with self.subTest(value=value):
                result = self.bgrid("execute", *self.unused_server, "--timeout", value, "--", "true")
                self.assert_usage_error(
                    result, "argument --timeout", repr(value), "maximum is 315576000000 seconds"
                )

    def test_timeout_rounding_to_zero_nanoseconds(self):
        for value in ["0.0000000001", "1e-10", "0.0000000005"]:
            with self.subTest(value=value):
                result = self.bgrid("execute", *self.unused_server, "--timeout", value, "--", "true")
                self.assert_usage_error(
                    result, "argument --timeout", repr(value), "rounds to 0 nanoseconds",
                    "minimum is 0.000000001 seconds",
                )

    def test_bad_priority(self):
        for value in ["99999999999", "-99999999999", "2147483648", "-2147483649", "1.5", "high"]:
            with self.subTest(value=value):
                result = self.bgrid(
                    "execute", *self.unused_server, "--input-root", self.directory,
                    "--priority", value, "--", "true",
                )
                self.assert_usage_error(
                    result, "argument --priority", repr(value),
                    "whole number from -2147483648 to 2147483647",
                )

    def test_numeric_limits_accepted(self):
        # Valid values pass the checks, so the command goes on to the unused server.
        cases = [
            ("--priority", "2147483647"),
            ("--priority", "-2147483648"),
            ("--timeout", "0.000000001"),
            ("--timeout", "315576000000"),
        ]
        for option, value in cases:
            with self.subTest(option=option, value=value):
                result = self.bgrid("execute", *self.unused_server, option, value, "--", "true")
                self.assert_command_error(result, "UNAVAILABLE")

    def test_bad_output_path(self):
        for value in ["/etc/passwd", "../up", "a//b"]:
            with self.subTest(value=value):
                result = self.bgrid("execute", *self.unused_server, "--output", value, "--", "true")
                self.assert_usage_error(result, "argument --output")

    def test_bad_server_address(self):
        for value in ["nowhere", "127.0.0.1:99999", "http://127.0.0.1:80"]:
            with self.subTest(value=value):
                result = self.bgrid("capabilities", "--server", value)
                self.assert_usage_error(result, "argument --server", "invalid server address")

    def test_execute_without_command(self):
        self.assert_usage_error(self.bgrid("execute", *self.unused_server), "COMMAND")

    def test_execute_action_with_command(self):
        result = self.bgrid("execute", *self.unused_server, "--action", VALID_DIGEST, "--", "true")
        self.assert_usage_error(result, "either COMMAND or --action")

        result = self.bgrid("execute", *self.unused_server, "--action", VALID_DIGEST, "--output", "x")
        self.assert_usage_error(result, "--output cannot be used with --action")

    def test_input_root_not_a_directory(self):
        result = self.bgrid(
            "execute", *self.unused_server, "--input-root", "no-such-dir", "--", "true"
        )
        self.assert_usage_error(result, "argument --input-root", "'no-such-dir' is not a directory")

    def test_download_outputs_not_empty(self):
        occupied = os.path.join(self.directory, "occupied")
        os.mkdir(occupied)
        open(os.path.join(occupied, "keep"), "w").close()

        result = self.bgrid("execute", *self.unused_server, "--download-outputs", occupied, "--", "true")

        self.assert_usage_error(result, "--download-outputs directory", "is not empty")

    def test_upload_missing_path(self):
        result = self.bgrid("cas", "upload", *self.unused_server, "no-such-file")
        self.assert_usage_error(result, "argument PATH", "'no-such-file' does not exist")

    def test_download_destination_checks(self):
        occupied = os.path.join(self.directory, "occupied")
        os.mkdir(occupied)
        open(os.path.join(occupied, "keep"), "w").close()

        result = self.bgrid("cas", "download", *self.unused_server, "--directory", VALID_DIGEST, occupied)
        self.assert_usage_error(result, "destination", "is not empty")

        result = self.bgrid("cas", "download", *self.unused_server, VALID_DIGEST, occupied)
        self.assert_usage_error(result, "is a directory")

        result = self.bgrid("cas", "download", *self.unused_server, VALID_DIGEST, "missing-dir/file")
        self.assert_usage_error(result, "'missing-dir' of destination", "does not exist")

        result = self.bgrid("cas", "download", *self.unused_server, "--tree", VALID_DIGEST, "-")
        self.assert_usage_error(result, "standard output")

        result = self.bgrid(
            "cas", "download", *self.unused_server, "--tree", "--directory", VALID_DIGEST, "out"
        )
        self.assert_usage_error(result, "not allowed with argument")

    def test_unreachable_server(self):
        upload_source = os.path.join(self.directory, "upload.txt")
        with open(upload_source, "w") as target:
            target.write("data")
        # Each command as its subcommand words and the arguments after the server options.
        commands = [
            (["capabilities"], []),
            (["cas", "upload"], [upload_source]),
            (["cas", "download"], [VALID_DIGEST.replace("/0", "/4"), "out"]),
            (["action-cache", "get"], [VALID_DIGEST]),
            (["operations", "list"], []),
            (["operations", "cancel"], ["operations/x"]),
            (["execute"], ["--", "true"]),
        ]
        for words, arguments in commands:
            with self.subTest(command=words):
                result = self.bgrid(*words, *self.unused_server, *arguments)
                self.assert_command_error(result, "UNAVAILABLE")
        self.assertEqual(os.listdir(self.directory), ["upload.txt"])
