"""Tests of the reason a queued job shows while no open bot session can run it."""

from google.rpc import error_details_pb2
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2
from tests.scheduler.helpers import (
    BotClient,
    RestartableScheduler,
    make_action,
    make_result,
    make_scheduler,
    submit,
)

WINDOWS = [("OSFamily", "windows")]
LINUX = [("OSFamily", "linux")]


def waiting_reason(operation):
    """Return the ErrorInfo in an Operation message's metadata, or None."""
    metadata = re_pb2.ExecuteOperationMetadata()
    assert operation.metadata.Unpack(metadata)
    infos = []
    for auxiliary in metadata.partial_execution_metadata.auxiliary_metadata:
        info = error_details_pb2.ErrorInfo()
        assert auxiliary.Unpack(info), auxiliary.type_url
        infos.append(info)
    assert len(infos) <= 1, infos
    return infos[0] if infos else None


class WaitingReasonTestCase(unittest.TestCase):
    def assert_waiting(self, scheduler, name, platform, missing=None):
        """Check that the operation shows NO_MATCHING_BOT with this metadata."""
        info = waiting_reason(scheduler.get_operation(name))
        self.assertIsNotNone(info, f"operation {name} shows no waiting reason")
        self.assertEqual(info.reason, "NO_MATCHING_BOT")
        self.assertEqual(info.domain, "bgrid")
        expected = {"platform": platform}
        if missing is not None:
            expected["missing"] = missing
        self.assertEqual(dict(info.metadata), expected)

    def assert_not_waiting(self, scheduler, name):
        self.assertIsNone(waiting_reason(scheduler.get_operation(name)))


class NoMatchingBotTests(WaitingReasonTestCase):
    def test_job_without_bots(self):
        scheduler, _ = make_scheduler(self)

        name = submit(scheduler, "a", platform=WINDOWS)

        self.assert_waiting(scheduler, name, "OSFamily=windows", missing="OSFamily=windows")
        self.assertEqual(scheduler.stats()["queued_jobs"], 1)

    def test_requirements_sorted_and_joined(self):
        scheduler, _ = make_scheduler(self)
        BotClient(scheduler, "linux", LINUX + [("cores", "8")])

        name = submit(scheduler, "a", platform=[("cores", "8"), ("OSFamily", "windows")])

        self.assert_waiting(
            scheduler, name, "OSFamily=windows,cores=8", missing="OSFamily=windows"
        )

    def test_only_combination_missing(self):
        scheduler, _ = make_scheduler(self)
        BotClient(scheduler, "windows", WINDOWS + [("cores", "4")])
        BotClient(scheduler, "linux", LINUX + [("cores", "8")])

        name = submit(scheduler, "a", platform=WINDOWS + [("cores", "8")])

        self.assert_waiting(scheduler, name, "OSFamily=windows,cores=8")

    def test_multi_valued_requirement_needs_every_value(self):
        scheduler, _ = make_scheduler(self)
        BotClient(scheduler, "partial", [("isa", "avx2")])

        name = submit(scheduler, "a", platform=[("isa", "avx2"), ("isa", "sse4")])

        self.assert_waiting(scheduler, name, "isa=avx2,isa=sse4", missing="isa=sse4")

    def test_no_requirements_waits_for_any_bot(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        self.assert_waiting(scheduler, name, "")

        BotClient(scheduler, "bot-1")

        self.assert_not_waiting(scheduler, name)

    def test_bot_of_other_instance_does_not_match(self):
        scheduler, _ = make_scheduler(self)
        BotClient(scheduler, "other", WINDOWS, parent="two")

        name = submit(scheduler, "a", instance_name="one", platform=WINDOWS)

        self.assert_waiting(scheduler, name, "OSFamily=windows", missing="OSFamily=windows")

    def test_attached_operation_shows_reason(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a", platform=WINDOWS)

        second = submit(scheduler, "a", platform=WINDOWS)

        self.assert_waiting(scheduler, second, "OSFamily=windows", missing="OSFamily=windows")

    def test_listed_operations_show_reason(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a", platform=WINDOWS)

        (listed,), _ = scheduler.list_operations("")

        self.assertEqual(waiting_reason(listed).metadata["platform"], "OSFamily=windows")

    def test_first_watch_message_shows_reason(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a", platform=WINDOWS)

        first = self.successResultOf(scheduler.watch_operation(name).next())

        self.assertEqual(waiting_reason(first).reason, "NO_MATCHING_BOT")


class ReasonUpdateTests(WaitingReasonTestCase):
    def test_matching_bot_clears_reason(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a", platform=WINDOWS)
        BotClient(scheduler, "linux", LINUX)
        self.assert_waiting(scheduler, name, "OSFamily=windows", missing="OSFamily=windows")

        windows = BotClient(scheduler, "windows", WINDOWS)

        self.assertIsNotNone(windows.lease)
        self.assert_not_waiting(scheduler, name)

    def test_busy_matching_bot_clears_reason(self):
        scheduler, _ = make_scheduler(self)
        windows = BotClient(scheduler, "windows", WINDOWS)
        first = submit(scheduler, "first", platform=WINDOWS)
        self.successResultOf(windows.update(wait=False))
        self.assertIsNotNone(windows.lease)

        second = submit(scheduler, "second", platform=WINDOWS)

        self.assert_not_waiting(scheduler, first)
        self.assert_not_waiting(scheduler, second)
        self.assertEqual(scheduler.stats()["queued_jobs"], 1)

    def test_closed_session_brings_reason_back(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=60)
        windows = BotClient(scheduler, "windows", WINDOWS)
        first = submit(scheduler, "first", platform=WINDOWS)
        self.successResultOf(windows.update(wait=False))
        second = submit(scheduler, "second", platform=WINDOWS)
        self.assert_not_waiting(scheduler, second)

        clock.advance(60)

        self.assertEqual(scheduler.stats()["bot_sessions"], 0)
        self.assert_waiting(scheduler, first, "OSFamily=windows", missing="OSFamily=windows")
        self.assert_waiting(scheduler, second, "OSFamily=windows", missing="OSFamily=windows")

    def test_changed_worker_properties_update_reason(self):
        scheduler, _ = make_scheduler(self)
        bot = BotClient(scheduler, "bot-1", LINUX)
        name = submit(scheduler, "a", platform=WINDOWS)
        self.assert_waiting(scheduler, name, "OSFamily=windows", missing="OSFamily=windows")

        request = bots_pb2.BotSession(
            name=bot.name, bot_id="bot-1", status=bots_pb2.OK,
            worker=worker_pb2.Worker(
                properties=[worker_pb2.Worker.Property(key="OSFamily", value="windows")]
            ),
        )
        session = self.successResultOf(scheduler.update_bot_session(bot.name, request))

        self.assertEqual(len(session.leases), 1)
        self.assert_not_waiting(scheduler, name)

    def test_terminating_bot_brings_reason_back(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a", platform=WINDOWS)
        bot = BotClient(scheduler, "bot-1", WINDOWS)
        lease_id = bot.lease.id

        request = bots_pb2.BotSession(
            name=bot.name, bot_id="bot-1", status=bots_pb2.BOT_TERMINATING,
            leases=[bots_pb2.Lease(id=lease_id, state=bots_pb2.CANCELLED)],
        )
        self.successResultOf(scheduler.update_bot_session(bot.name, request))

        self.assert_waiting(scheduler, name, "OSFamily=windows", missing="OSFamily=windows")

    def test_done_operation_has_no_reason(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a", platform=WINDOWS)

        scheduler.cancel_operation(name)

        self.assert_not_waiting(scheduler, name)

    def test_completed_job_has_no_reason(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=60)
        name = submit(scheduler, "a", platform=WINDOWS)
        bot = BotClient(scheduler, "bot-1", WINDOWS)
        self.successResultOf(bot.complete(make_result()))

        clock.advance(60)

        self.assertTrue(scheduler.get_operation(name).done)
        self.assert_not_waiting(scheduler, name)

    def test_other_platforms_keep_reason(self):
        scheduler, _ = make_scheduler(self)
        windows_names = [submit(scheduler, f"w{index}", platform=WINDOWS) for index in range(3)]
        linux_names = [submit(scheduler, f"l{index}", platform=LINUX) for index in range(3)]

        BotClient(scheduler, "windows", WINDOWS)

        for name in windows_names:
            self.assert_not_waiting(scheduler, name)
        for name in linux_names:
            self.assert_waiting(scheduler, name, "OSFamily=linux", missing="OSFamily=linux")


class ReasonRecoveryTests(WaitingReasonTestCase):
    async def test_reason_computed_after_restart(self):
        restartable = RestartableScheduler(self, bot_keepalive_timeout=60)
        scheduler = await restartable.start()
        BotClient(scheduler, "linux", LINUX)
        windows_name = submit(scheduler, "w", platform=WINDOWS)
        linux_digest, linux_action = make_action("l", platform=LINUX)
        await restartable.settle()

        scheduler = await restartable.restart()

        self.assert_waiting(
            scheduler, windows_name, "OSFamily=windows", missing="OSFamily=windows"
        )
        # The restored session of the Linux bot counts until its keepalive ends.
        linux_name = scheduler.submit("", linux_digest, linux_action, platform=LINUX)
        self.assert_not_waiting(scheduler, linux_name)
        restartable.clock.advance(60)
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)
        self.assert_waiting(scheduler, linux_name, "OSFamily=linux", missing="OSFamily=linux")
