"""The exec scenario: Execute throughput and latency, with the tool playing no-op bots.

Each operation uploads a new action (its Command, an input root with one file, and the
Action) and then calls Execute, so no server finds its result in the action cache. Latency
runs from the Execute call to the done Operation; the upload counts only in throughput.
As many no-op bots as clients serve the leases over the Bots API.
"""

import asyncio
import contextlib
import time

import grpc
from google.rpc import code_pb2, status_pb2

from bench.load import CheckError, Operation
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc

CLIENT_COUNTS = (1, 16, 32)

# Deadline of each UpdateBotSession call in seconds. Servers keep an idle bot's call open
# for up to about 20 s (bgrid's default long poll), so this leaves them time to respond.
POLL_TIMEOUT_SECONDS = 30.0

# Deadline of an Execute call in seconds, from the call to the done Operation.
EXECUTE_TIMEOUT_SECONDS = 120.0

# Seconds a no-op bot waits before it calls again after a failed call.
RETRY_DELAY_SECONDS = 0.5

# Deadline in seconds of the last UpdateBotSession, which reports BOT_TERMINATING. A server
# records the status when the call arrives, and bgrid then keeps the call open as a long
# poll until this deadline passes.
TERMINATE_TIMEOUT_SECONDS = 1.0

# Seconds to wait for a report of the ACTIVE state once the COMPLETED report returned.
ACTIVE_REPORT_GRACE_SECONDS = 1.0

OK_STATUS = status_pb2.Status(code=code_pb2.OK)

PENDING = bots_pb2.LeaseState.PENDING
ACTIVE = bots_pb2.LeaseState.ACTIVE
COMPLETED = bots_pb2.LeaseState.COMPLETED
CANCELLED = bots_pb2.LeaseState.CANCELLED


class NoOpBot:
    """A bot session that completes every lease at once with exit code 0 and no outputs.

    For each PENDING lease it reports ACTIVE and keeps that call open, as a real bot does
    while its action runs. The no-op action ends at once, so the bot reports COMPLETED in
    a second call without waiting for the first, and bgrid then ends the first call. A
    lease that arrives ACTIVE (BuildGrid activates leases itself) is reported COMPLETED at
    once. The lease payload may pack an Action or a Digest. Any other payload is completed
    with INVALID_ARGUMENT.
    """

    def __init__(self, channel, instance_name, bot_id):
        self._stub = bots_pb2_grpc.BotsStub(channel)
        self._instance_name = instance_name
        self.bot_id = bot_id
        self.session = None
        self.completed = 0
        self.invalid_payloads = 0
        self.errors = 0
        self.first_error = None

    async def run(self):
        """Serve leases until cancelled."""
        self.session = await self._create_session()
        while True:
            try:
                self.session = await self._step(self.session)
            except grpc.aio.AioRpcError as error:
                self.record_error(error)
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    self.session = await self._create_session()
                else:
                    await asyncio.sleep(RETRY_DELAY_SECONDS)

    async def terminate(self):
        """Report BOT_TERMINATING, so that the server assigns no more work to this session.

        Without it BuildGrid 0.4.4 leases jobs to the abandoned session until its keepalive
        expires. Call it after ``run`` was cancelled.
        """
        if self.session is None:
            return
        report = bots_pb2.BotSession()
        report.CopyFrom(self.session)
        report.status = bots_pb2.BotStatus.BOT_TERMINATING
        request = bots_pb2.UpdateBotSessionRequest(name=report.name, bot_session=report)
        try:
            await self._stub.UpdateBotSession(request, timeout=TERMINATE_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                self.record_error(error)

    async def _create_session(self):
        request = bots_pb2.CreateBotSessionRequest(
            parent=self._instance_name,
            bot_session=bots_pb2.BotSession(bot_id=self.bot_id, status=bots_pb2.BotStatus.OK),
        )
        return await self._stub.CreateBotSession(request, timeout=POLL_TIMEOUT_SECONDS)

    async def _step(self, session):
        """Make one round of calls and return the session the server sent last."""
        # Leases the server still lists after they finished are left out of the next report.
        finished = [lease for lease in session.leases if lease.state in (COMPLETED, CANCELLED)]
        for lease in finished:
            session.leases.remove(lease)

        # bgrid sends a new lease as PENDING, but BuildGrid 0.4.4 sends it as ACTIVE already.
        work = [lease for lease in session.leases if lease.state in (PENDING, ACTIVE)]
        if not work:
            return await self._update(session)

        active_report = None
        pending = [lease for lease in work if lease.state == PENDING]
        if pending:
            for lease in pending:
                lease.state = ACTIVE
            active_report = asyncio.ensure_future(self._update(session))
            # Let the ACTIVE report go out before the COMPLETED one.
            await asyncio.sleep(0)

        completed_report = bots_pb2.BotSession()
        completed_report.CopyFrom(session)
        for lease in completed_report.leases:
            if lease.state == ACTIVE:
                self._complete(lease)
        try:
            session = await self._update(completed_report)
        finally:
            if active_report is not None:
                await self._finish_report(active_report)
        return session

    def _complete(self, lease):
        lease.state = COMPLETED
        if lease.payload.Is(re_pb2.Action.DESCRIPTOR) or lease.payload.Is(re_pb2.Digest.DESCRIPTOR):
            lease.result.Pack(re_pb2.ActionResult(exit_code=0))
            lease.status.CopyFrom(OK_STATUS)
            self.completed += 1
        else:
            self.invalid_payloads += 1
            lease.status.CopyFrom(
                status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT,
                    message=f"lease payload {lease.payload.type_url!r} is neither an Action nor a Digest",
                )
            )

    async def _finish_report(self, report):
        """Wait briefly for the response to the ACTIVE report, then cancel the call.

        The response is dropped, because the COMPLETED report's response is newer.
        """
        try:
            await asyncio.wait_for(report, ACTIVE_REPORT_GRACE_SECONDS)
        except asyncio.TimeoutError:
            pass
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.record_error(error)

    async def _update(self, session):
        request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
        return await self._stub.UpdateBotSession(request, timeout=POLL_TIMEOUT_SECONDS)

    def record_error(self, error):
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{error.code().name}: {error.details()}"


@contextlib.asynccontextmanager
async def running_bots(address, instance_name, count, label):
    """Run ``count`` NoOpBots on their own channel, yield the list, and stop them on exit."""
    async with grpc.aio.insecure_channel(address) as channel:
        bots = [NoOpBot(channel, instance_name, f"{label}-{index}") for index in range(count)]
        tasks = [asyncio.ensure_future(bot.run()) for bot in bots]
        try:
            yield bots
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for bot, result in zip(bots, results):
                if isinstance(result, grpc.aio.AioRpcError):
                    bot.record_error(result)
            await asyncio.gather(*(bot.terminate() for bot in bots))


async def execute(bench):
    """Execute new actions from 1, 16 and 32 clients, each with as many no-op bots."""
    execution = remote_execution_pb2_grpc.ExecutionStub(bench.channel)
    records = []
    for clients in CLIENT_COUNTS:
        label = bench.blobs.make_text(f"bench-bot-c{clients}")
        async with running_bots(bench.server.address, bench.instance_name, clients, label) as bots:

            async def operation(caller):
                return await execute_new_action(bench, execution)

            record = await bench.measure("exec", clients_case(clients), operation, clients)
        records.append(add_bot_figures(record, bots))
    return records


def clients_case(clients):
    """Return the case name of a run with ``clients`` callers: "1 client", "16 clients"."""
    return f"{clients} client" if clients == 1 else f"{clients} clients"


async def execute_new_action(bench, execution):
    """Upload a new action, Execute it until its Operation is done, and return the Operation.

    The latency runs from the Execute call to the done Operation. Raises CheckError when
    the action did not succeed.
    """
    action_digest = await bench.upload_new_action()
    request = re_pb2.ExecuteRequest(instance_name=bench.instance_name, action_digest=action_digest)
    start = time.perf_counter()
    last = None
    async for operation_message in execution.Execute(request, timeout=EXECUTE_TIMEOUT_SECONDS):
        last = operation_message
        if last.done:
            break
    latency = time.perf_counter() - start
    check_done_operation(last)
    return Operation(latency)


def add_bot_figures(record, bots):
    """Add the no-op bots' counts (bots, leases completed, errors) to a case's record."""
    record["bots"] = len(bots)
    record["leases_completed"] = sum(bot.completed for bot in bots)
    bot_errors = sum(bot.errors for bot in bots) + sum(bot.invalid_payloads for bot in bots)
    record["bot_errors"] = bot_errors
    first_bot_error = next((bot.first_error for bot in bots if bot.first_error), None)
    if first_bot_error:
        record["first_bot_error"] = first_bot_error
    return record


def check_done_operation(operation):
    """Raise CheckError unless ``operation`` is done with a successful ExecuteResponse."""
    if operation is None or not operation.done:
        raise CheckError("the Execute stream ended before the operation was done")
    if operation.HasField("error"):
        raise CheckError(f"the operation failed: code {operation.error.code}: {operation.error.message}")
    response = re_pb2.ExecuteResponse()
    if not operation.response.Unpack(response):
        raise CheckError(f"the operation's response is a {operation.response.type_url}, not an ExecuteResponse")
    if response.status.code != 0:
        raise CheckError(f"the action failed: code {response.status.code}: {response.status.message}")
    if response.result.exit_code != 0:
        raise CheckError(f"the action exited with code {response.result.exit_code}")
