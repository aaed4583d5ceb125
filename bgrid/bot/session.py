"""One bot session of the Remote Workers API, holding at most one lease at a time.

The loop creates the session with CreateBotSession and then calls UpdateBotSession again and
again, each call reporting the bot's view of its lease:

* A PENDING lease from the server is accepted: the next report marks it ACTIVE and the
  action starts.
* While the action runs, one UpdateBotSession call is always open as a long poll, so a
  CANCELLED lease is seen at once. The action's process group is then killed and the lease
  dropped. When the action finishes first, the open call is cancelled and the result is
  reported at once as COMPLETED.
* A lease reported as COMPLETED is dropped as soon as a report carrying it succeeds.
* NOT_FOUND for the session (it expired, or the server restarted) drops the session and the
  lease, and a new session is created. Other failures are retried with capped exponential
  backoff.
* When the loop is cancelled, because the bot stops, the open call is cancelled, the
  action's process group is killed, and one last UpdateBotSession reports status
  BOT_TERMINATING. It returns a running lease as CANCELLED with status UNAVAILABLE, so that
  the server requeues its job at once without counting a retry, or reports a finished one
  as COMPLETED. The server then closes the session.
"""

import asyncio
import contextlib
import random

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2
from twisted.internet import task
from twisted.logger import Logger

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.bridge import as_future
from bgrid.errors import make_status

# Deadline of each UpdateBotSession call, in seconds. bgrid's server keeps an idle bot's call
# open for at most 20 s by default (--max-long-poll), so this leaves it time to respond.
POLL_TIMEOUT_SECONDS = 30.0

# Deadline in seconds of the last UpdateBotSession call of a stopping bot. When the call
# fails or times out, the server closes the session after its keepalive timeout instead.
STOP_REPORT_TIMEOUT_SECONDS = 5.0


class Backoff:
    """Capped exponential delays, in seconds, with jitter so that bots do not retry in step.

    The n-th delay (from 0) is ``min(initial * 2**n, maximum)`` times a factor between 0.5
    and 1 taken from ``random_fraction()``.
    """

    def __init__(self, initial=0.5, maximum=30.0, random_fraction=random.random):
        self.initial = initial
        self.maximum = maximum
        self._random_fraction = random_fraction
        self._failures = 0

    def next_delay(self):
        """Return the delay before the next retry and count one more failure."""
        delay = min(self.initial * 2 ** self._failures, self.maximum)
        self._failures = min(self._failures + 1, 64)
        return delay * (0.5 + self._random_fraction() / 2)

    def reset(self):
        """Start again from ``initial`` after a success."""
        self._failures = 0


class SessionLoop:
    """Keeps one bot session alive and runs the leases that the server assigns to it.

    ``execute(payload, lease_id, bot_id)`` is a coroutine function returning a
    ``LeaseOutcome`` (see ``ActionExecutor.execute``); it is cancelled when the server
    cancels the lease. ``worker`` is the ``Worker`` message reported at session creation.
    Retry delays run on ``clock`` (an ``IReactorTime``). ``stop_report_timeout`` is the
    deadline in seconds of the last call when the loop is cancelled.
    """

    log = Logger()

    def __init__(self, stub, bot_id, instance_name, worker, version, execute, clock,
                 backoff=None, poll_timeout=POLL_TIMEOUT_SECONDS,
                 stop_report_timeout=STOP_REPORT_TIMEOUT_SECONDS):
        self.bot_id = bot_id
        self.session_name = None
        self._stub = stub
        self._instance_name = instance_name
        self._worker = worker
        self._version = version
        self._execute = execute
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._poll_timeout = poll_timeout
        self._stop_report_timeout = stop_report_timeout
        self._lease = None  # the bot's view of its lease: id, state, status, result
        self._task = None  # the asyncio task running the lease's action

    @property
    def lease(self):
        """The bot's view of its current lease, a ``Lease`` message, or None."""
        return self._lease

    async def run(self):
        """Run until cancelled; then stop the running action and close the session."""
        try:
            while True:
                try:
                    if self.session_name is None:
                        await self._create_session()
                        self._backoff.reset()
                    await self._update_session()
                    self._backoff.reset()
                except grpc.aio.AioRpcError as error:
                    await self._handle_error(error)
        finally:
            await self._terminate()

    # --- calls -----------------------------------------------------------------------------

    async def _create_session(self):
        request = bots_pb2.CreateBotSessionRequest(
            parent=self._instance_name,
            bot_session=bots_pb2.BotSession(
                bot_id=self.bot_id,
                status=bots_pb2.OK,
                worker=self._worker,
                version=self._version,
            ),
        )
        session = await self._stub.CreateBotSession(request, timeout=self._poll_timeout)
        self.session_name = session.name
        self.log.info("bot {bot_id} created session {session}", bot_id=self.bot_id,
                      session=session.name)
        # A new session may come with a lease already assigned.
        await self._apply(session)

    def _report(self, status=bots_pb2.OK):
        session = bots_pb2.BotSession(
            name=self.session_name,
            bot_id=self.bot_id,
            status=status,
            worker=self._worker,
            version=self._version,
        )
        if self._lease is not None:
            session.leases.append(self._lease)
        return bots_pb2.UpdateBotSessionRequest(name=self.session_name, bot_session=session)

    async def _update_session(self):
        if self._task is not None and self._task.done() and self._lease.state == bots_pb2.ACTIVE:
            self._complete_lease()

        request = self._report()
        reported_state = self._lease.state if self._lease is not None else None
        call = self._stub.UpdateBotSession(request, timeout=self._poll_timeout)

        if self._task is not None and not self._task.done():
            poll = asyncio.ensure_future(call)
            action_finished_first = True
            try:
                await asyncio.wait({poll, self._task}, return_when=asyncio.FIRST_COMPLETED)
                action_finished_first = not poll.done()
            finally:
                if not poll.done():
                    call.cancel()
                    poll.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await poll
            if action_finished_first:
                # Report the result right away, in the next round.
                return
            session = poll.result()
        else:
            session = await call

        if reported_state == bots_pb2.COMPLETED:
            self.log.info("bot {bot_id} reported lease {lease_id} as completed",
                          bot_id=self.bot_id, lease_id=self._lease.id)
            self._lease = None
            self._task = None
        await self._apply(session)

    async def _handle_error(self, error):
        code = error.code()
        if code == grpc.StatusCode.NOT_FOUND and self.session_name is not None:
            self.log.warn(
                "bot {bot_id}: session {session} was not found on the server ({details}); "
                "creating a new session",
                bot_id=self.bot_id, session=self.session_name, details=error.details(),
            )
            self.session_name = None
            await self._drop_lease("its session is gone")
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.session_name is not None:
            # The server kept the long poll open past the bot's deadline, which is no failure.
            return
        delay = self._backoff.next_delay()
        self.log.warn(
            "bot {bot_id}: call to the server failed: {code}: {details}; retrying in "
            "{delay:.1f} s",
            bot_id=self.bot_id, code=code.name, details=error.details(), delay=delay,
        )
        await as_future(task.deferLater(self._clock, delay, lambda: None))

    # --- leases ----------------------------------------------------------------------------

    async def _apply(self, session):
        for lease in session.leases:
            if self._lease is not None and lease.id == self._lease.id:
                if lease.state == bots_pb2.CANCELLED:
                    self.log.info("bot {bot_id}: the server cancelled lease {lease_id}",
                                  bot_id=self.bot_id, lease_id=lease.id)
                    await self._drop_lease("the server cancelled it")
                continue
            if lease.state != bots_pb2.PENDING:
                # An echo of a lease already dropped, or a cancellation of one; nothing to do.
                continue
            if self._lease is not None:
                self.log.warn(
                    "bot {bot_id}: ignoring lease {lease_id} because lease {current} is still "
                    "running; each session runs one lease at a time",
                    bot_id=self.bot_id, lease_id=lease.id, current=self._lease.id,
                )
                continue
            self._accept(lease)

    def _accept(self, lease):
        self.log.info("bot {bot_id} accepted lease {lease_id}", bot_id=self.bot_id,
                      lease_id=lease.id)
        self._lease = bots_pb2.Lease(id=lease.id, state=bots_pb2.ACTIVE)
        self._task = asyncio.ensure_future(self._execute(lease.payload, lease.id, self.bot_id))

    def _complete_lease(self):
        try:
            outcome = self._task.result()
        except asyncio.CancelledError:
            status, result = make_status(code_pb2.CANCELLED, "the action was cancelled"), None
        except Exception as error:
            self.log.failure("bot {bot_id}: lease {lease_id} failed", bot_id=self.bot_id,
                             lease_id=self._lease.id)
            status = make_status(code_pb2.INTERNAL, f"bot {self.bot_id} failed: {error!r}")
            result = None
        else:
            status, result = outcome.status, outcome.result
        self._lease.state = bots_pb2.COMPLETED
        self._lease.status.CopyFrom(status)
        if result is not None:
            packed = any_pb2.Any()
            packed.Pack(result)
            self._lease.result.CopyFrom(packed)
        self.log.info(
            "bot {bot_id}: lease {lease_id} finished with status {code}",
            bot_id=self.bot_id, lease_id=self._lease.id, code=code_pb2.Code.Name(status.code),
        )

    async def _terminate(self):
        """Stop the running action and send the server the last report, BOT_TERMINATING.

        Errors of the call are logged, because the server closes the session after its
        keepalive timeout anyway.
        """
        lease = self._lease
        if lease is not None and lease.state == bots_pb2.ACTIVE:
            if self._task is not None and self._task.done():
                self._complete_lease()
            else:
                await self._cancel_action(self._task)
                lease.state = bots_pb2.CANCELLED
                lease.status.CopyFrom(
                    make_status(code_pb2.UNAVAILABLE, f"bot {self.bot_id} is stopping")
                )
        if self.session_name is None:
            await self._drop_lease("the bot is stopping")
            return

        request = self._report(status=bots_pb2.BOT_TERMINATING)
        returned = "no lease"
        if lease is not None:
            returned = f"lease {lease.id} as {bots_pb2.LeaseState.Name(lease.state)}"
        try:
            await self._stub.UpdateBotSession(request, timeout=self._stop_report_timeout)
        except grpc.aio.AioRpcError as error:
            self.log.warn(
                "bot {bot_id} failed to report BOT_TERMINATING and {returned} for session "
                "{session}: {code}: {details}. The server closes the session after its "
                "keepalive timeout",
                bot_id=self.bot_id, returned=returned, session=self.session_name,
                code=error.code().name, details=error.details(),
            )
        else:
            self.log.info(
                "bot {bot_id} reported BOT_TERMINATING and {returned} for session {session}",
                bot_id=self.bot_id, returned=returned, session=self.session_name,
            )
        self.session_name = None
        self._lease = None
        self._task = None

    @staticmethod
    async def _cancel_action(running):
        """Cancel an action's task if it runs, which kills its process group, and wait."""
        if running is not None and not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({running})

    async def _drop_lease(self, reason):
        """Cancel the running action, if any, wait for its cleanup, and forget the lease."""
        if self._lease is None:
            return
        lease_id = self._lease.id
        completed = self._lease.state == bots_pb2.COMPLETED
        running = self._task
        self._lease = None
        self._task = None
        await self._cancel_action(running)
        # A completed lease is usually dropped while its report waits as a long poll for the
        # server's response. The server has normally applied the report by then.
        log = self.log.debug if completed else self.log.info
        log("bot {bot_id} dropped lease {lease_id}: {reason}", bot_id=self.bot_id,
            lease_id=lease_id, reason=reason)
