"""Builders of scheduler inputs, a test bot that drives the Bots API of a Scheduler, and a
scheduler over LMDB that a test can crash and restart."""

import math

from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from twisted.internet import task
from twisted.logger import globalLogPublisher

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2
from bgrid.digest import Digest
from bgrid.scheduler import Scheduler
from bgrid.scheduler.store import LmdbSchedulerStore
from bgrid.scheduler.timeouts import with_timeout
from bgrid.storage.environment import LmdbEnvironment
from tests.util import make_temp_dir

# Enough for every test here, and small enough that a temporary directory never grows large.
TEST_MAP_SIZE = 64 * 2**20

# The Scheduler's default max_action_timeout, in seconds, which the lease of an action
# without a timeout carries.
DEFAULT_MAX_ACTION_TIMEOUT = 3600.0


def make_scheduler(test_case, **options):
    """Return a Scheduler on a fresh ``task.Clock`` and the clock, and stop it at the end."""
    clock = task.Clock()
    scheduler = Scheduler(clock, **options)
    test_case.addCleanup(scheduler.stop)
    return scheduler, clock


def make_action(label, platform=(), do_not_cache=False):
    """Return ``(digest, action)`` for an Action that differs for each ``label``."""
    action = re_pb2.Action(
        command_digest=Digest.of(f"command {label}".encode()).to_proto(re_pb2.Digest),
        input_root_digest=Digest.of(b"").to_proto(re_pb2.Digest),
        do_not_cache=do_not_cache,
    )
    for name, value in platform:
        action.platform.properties.add(name=name, value=value)
    return Digest.of(action.SerializeToString()), action


def as_leased(action, timeout=DEFAULT_MAX_ACTION_TIMEOUT):
    """Return ``action`` as a lease payload carries it: with the timeout the bot enforces."""
    return with_timeout(action, timeout)


def submit(scheduler, label, instance_name="", **options):
    """Submit the action of ``label`` and return the operation name."""
    digest, action = make_action(label)
    return scheduler.submit(instance_name, digest, action, **options)


def make_bot_session(bot_id, properties=(), device_properties=()):
    """Return a BotSession message for CreateBotSession."""
    worker = worker_pb2.Worker(
        properties=[worker_pb2.Worker.Property(key=k, value=v) for k, v in properties]
    )
    if device_properties:
        worker.devices.add(
            handle="device-0",
            properties=[worker_pb2.Device.Property(key=k, value=v) for k, v in device_properties],
        )
    return bots_pb2.BotSession(bot_id=bot_id, status=bots_pb2.OK, worker=worker)


def make_result(exit_code=0, stdout=b""):
    return re_pb2.ActionResult(exit_code=exit_code, stdout_raw=stdout)


def operation_response(operation):
    """Return the ExecuteResponse packed in a done Operation message."""
    response = re_pb2.ExecuteResponse()
    assert operation.response.Unpack(response)
    return response


def operation_stage(operation):
    metadata = re_pb2.ExecuteOperationMetadata()
    assert operation.metadata.Unpack(metadata)
    return metadata.stage


def capture_logs(test_case):
    """Return a list that receives every log event until the test ends."""
    events = []
    globalLogPublisher.addObserver(events.append)
    test_case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class BotClient:
    """A bot that talks to a Scheduler through its Bots API, one session at a time.

    ``session`` is the last BotSession message the scheduler returned, and ``leases`` the
    bot's view of its leases, which it sends with each update.
    """

    def __init__(self, scheduler, bot_id, properties=(), parent="", device_properties=()):
        self.scheduler = scheduler
        self.bot_id = bot_id
        self.session = scheduler.create_bot_session(
            parent, make_bot_session(bot_id, properties, device_properties)
        )
        self.leases = list(self.session.leases)

    @property
    def name(self):
        return self.session.name

    @property
    def lease(self):
        """The lease of the last response, or None."""
        return self.session.leases[0] if self.session.leases else None

    def update(self, leases=None, deadline=None, wait=True):
        """Send UpdateBotSession with ``leases`` (default: the bot's view) and return the
        Deferred. The response becomes ``session`` and the bot's new view.

        With ``wait=False`` the deadline is in the past, so the call returns at once.
        """
        if not wait:
            deadline = -math.inf
        request = bots_pb2.BotSession(name=self.name, bot_id=self.bot_id, status=bots_pb2.OK)
        request.leases.extend(self.leases if leases is None else leases)
        deferred = self.scheduler.update_bot_session(self.name, request, deadline)
        deferred.addCallback(self._store)
        return deferred

    def _store(self, session):
        self.session = session
        self.leases = list(session.leases)
        return session

    def accept(self, wait=False):
        """Report the current lease ACTIVE and return the Deferred of the update."""
        lease = bots_pb2.Lease()
        lease.CopyFrom(self.lease)
        lease.state = bots_pb2.ACTIVE
        lease.ClearField("payload")
        return self.update([lease], wait=wait)

    def complete(self, result=None, code=code_pb2.OK, lease_id=None, wait=False):
        """Report a lease COMPLETED with ``result`` and return the Deferred of the update."""
        lease = bots_pb2.Lease(
            id=lease_id or self.lease.id,
            state=bots_pb2.COMPLETED,
            status=status_pb2.Status(code=code),
        )
        if result is not None:
            packed = any_pb2.Any()
            packed.Pack(result)
            lease.result.CopyFrom(packed)
        return self.update([lease], wait=wait)

    def leased_action(self):
        """Return the Action packed in the current lease's payload."""
        action = re_pb2.Action()
        assert self.lease.payload.Unpack(action)
        return action


class RestartableScheduler:
    """A Scheduler over an LMDB environment in a temporary directory, which a test can crash
    and start again on the same directory.

    ``scheduler``, ``clock``, ``store`` and ``environment`` are those of the current run.
    Each run has a new ``task.Clock`` that starts at the time the previous clock reached,
    as the wall clock would. ``options`` are passed to every Scheduler.
    """

    def __init__(self, test_case, **options):
        self.path = make_temp_dir(test_case)
        self.options = options
        self.scheduler = None
        self.clock = None
        self.store = None
        self.environment = None
        test_case.addCleanup(self._close)

    async def start(self, downtime=0, **options):
        """Open the environment, build a scheduler and recover it; return the scheduler.

        The new clock starts ``downtime`` seconds after the time the previous one reached.
        ``options`` override the options given at construction for this run.
        """
        self.environment = LmdbEnvironment(
            self.path, LmdbSchedulerStore.DATABASE_NAMES, map_size=TEST_MAP_SIZE
        )
        self.environment.start()
        now = self.clock.seconds() + downtime if self.clock is not None else 0
        self.clock = task.Clock()
        self.clock.advance(now)
        self.store = LmdbSchedulerStore(self.environment)
        self.scheduler = Scheduler(self.clock, store=self.store, **{**self.options, **options})
        await self.scheduler.recover()
        return self.scheduler

    async def crash(self):
        """Drop the scheduler without stopping it, as ``kill -9`` would, and close LMDB.

        Changes that the journal has not handed to the environment yet are lost, because
        the write is a call on the dropped clock. Writes handed over already are committed
        while the environment closes, as if the crash came just after their commit.
        """
        self.scheduler = None
        await self.environment.stop()

    async def restart(self, downtime=0, **options):
        """Crash, then start again ``downtime`` seconds later; return the new scheduler."""
        await self.crash()
        return await self.start(downtime, **options)

    async def settle(self, deferred=None):
        """Run the journal's scheduled write and return the result of ``deferred``.

        ``deferred`` defaults to ``scheduler.durable()``, so that the call waits until
        every change so far is committed.
        """
        if deferred is None:
            deferred = self.scheduler.durable()
        self.clock.advance(0)
        return await deferred

    async def _close(self):
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.environment is not None:
            await self.environment.stop()
