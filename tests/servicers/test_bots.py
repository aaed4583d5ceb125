"""Tests of the Remote Workers Bots service through a real gRPC server and scheduler."""

import asyncio

import grpc

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.digest import Digest
from tests.servicers.support import (
    WAIT_TIMEOUT,
    ExecutionServicerTestCase,
    RemoteBot,
)
from tests.util import async_test

LINUX = ("OSFamily", "linux")
MACOS = ("OSFamily", "macos")


class CreateBotSessionTests(ExecutionServicerTestCase):
    @async_test
    async def test_new_session(self):
        session = await RemoteBot(self.bots, "bot-1").create()
        self.assertTrue(session.name.startswith("main/botSessions/"), session.name)
        self.assertEqual(session.bot_id, "bot-1")
        self.assertTrue(session.HasField("expire_time"))
        self.assertEqual(list(session.leases), [])

    @async_test
    async def test_multi_segment_parent(self):
        parent = "projects/p/instances/main"
        session = await RemoteBot(self.bots, "bot-1", parent=parent).create()
        self.assertTrue(session.name.startswith(f"{parent}/botSessions/"), session.name)

    @async_test
    async def test_empty_bot_id(self):
        await self.assert_rpc_error(
            RemoteBot(self.bots, "").create(), grpc.StatusCode.INVALID_ARGUMENT, "bot_id"
        )

    @async_test
    async def test_unknown_parent(self):
        await self.assert_rpc_error(
            RemoteBot(self.bots, "bot-1", parent="nowhere").create(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "parent",
            "'nowhere'",
        )


class UpdateBotSessionTests(ExecutionServicerTestCase):
    @async_test
    async def test_unknown_session(self):
        request = bots_pb2.UpdateBotSessionRequest(
            name="main/botSessions/unknown",
            bot_session=bots_pb2.BotSession(name="main/botSessions/unknown", bot_id="bot-1"),
        )
        await self.assert_rpc_error(
            self.bots.UpdateBotSession(request), grpc.StatusCode.NOT_FOUND, "main/botSessions/unknown"
        )

    @async_test
    async def test_other_bot_id(self):
        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        request = bots_pb2.UpdateBotSessionRequest(
            name=bot.session.name,
            bot_session=bots_pb2.BotSession(name=bot.session.name, bot_id="bot-2"),
        )
        await self.assert_rpc_error(
            self.bots.UpdateBotSession(request), grpc.StatusCode.INVALID_ARGUMENT, "bot-2"
        )

    @async_test
    async def test_long_poll_returns_on_submit(self):
        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        polling = asyncio.ensure_future(bot.update(wait=True))
        await self.wait_for_idle_bots(1)
        self.assertFalse(polling.done())

        action_digest = await self.store_action()
        call = self.execute(action_digest)
        await self.next_operation(call)

        # The scheduler's clock never moves here, so only the new job can end the poll.
        session = await asyncio.wait_for(polling, WAIT_TIMEOUT)
        self.assertEqual([lease.state for lease in session.leases], [bots_pb2.PENDING])
        action = bot.leased_action()
        # The lease adds the server's maximum timeout to an action without one.
        action.ClearField("timeout")
        self.assertEqual(Digest.of(action.SerializeToString()), action_digest)

    @async_test
    async def test_abandoned_long_poll_gets_no_work(self):
        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        polling = asyncio.ensure_future(bot.update(wait=True))
        await self.wait_for_idle_bots(1)

        polling.cancel()
        for _ in range(int(WAIT_TIMEOUT / 0.01)):
            if self.scheduler.stats()["idle_bots"] == 0:
                break
            await asyncio.sleep(0.01)
        self.assertEqual(self.scheduler.stats()["idle_bots"], 0)

        action_digest = await self.store_action()
        await self.next_operation(self.execute(action_digest))
        self.assertEqual(self.scheduler.stats()["queued_jobs"], 1)
        self.assertEqual(self.scheduler.stats()["leases"], 0)


class PlatformPropertiesTests(ExecutionServicerTestCase):
    @async_test
    async def test_queued_job_goes_to_matching_bot(self):
        action_digest = await self.store_action(platform=[LINUX])
        call = self.execute(action_digest)
        await self.next_operation(call)

        mac = RemoteBot(self.bots, "mac", properties=[MACOS])
        await mac.create()
        self.assertIsNone(mac.lease)
        plain = RemoteBot(self.bots, "plain")
        await plain.create()
        self.assertIsNone(plain.lease)

        linux = RemoteBot(self.bots, "linux", properties=[LINUX, ("cores", "8")])
        await linux.create()
        self.assertIsNotNone(linux.lease)
        leased = linux.leased_action()
        leased.ClearField("timeout")
        self.assertEqual(Digest.of(leased.SerializeToString()), action_digest)
        requirements = [(p.key, p.value) for p in linux.lease.requirements.properties]
        self.assertEqual(requirements, [LINUX])

        await mac.update()
        self.assertIsNone(mac.lease)

    @async_test
    async def test_waiting_bots_get_matching_jobs(self):
        mac = RemoteBot(self.bots, "mac", properties=[MACOS])
        linux = RemoteBot(self.bots, "linux", properties=[LINUX])
        await mac.create()
        await linux.create()
        mac_polling = asyncio.ensure_future(mac.update(wait=True))
        linux_polling = asyncio.ensure_future(linux.update(wait=True))
        self.addCleanup(mac_polling.cancel)
        await self.wait_for_idle_bots(2)

        action_digest = await self.store_action(platform=[LINUX])
        await self.next_operation(self.execute(action_digest))

        session = await asyncio.wait_for(linux_polling, WAIT_TIMEOUT)
        self.assertEqual([lease.state for lease in session.leases], [bots_pb2.PENDING])
        # The job went to the Linux bot as it was submitted, so the Mac bot still waits.
        self.assertEqual(self.scheduler.stats()["idle_bots"], 1)
        self.assertFalse(mac_polling.done())
