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
* CreateBotSession failing with a code in PERMANENT_CREATE_CODES ends the loop with
  SessionRejectedError, because no retry can fix the bot's configuration.
* NOT_FOUND for the session (it expired, or another bot with the same bot id replaced it)
  drops the session and the lease, and a new session is created: at once for the first
  NOT_FOUND_BEFORE_BACKOFF responses in a row, after a growing delay from then on. Other
  failures are retried with capped exponential backoff. A completed lease's report is
  retried only for as long as the lease can still be valid on the server, and then the
  result is given up.
* When the loop is cancelled, because the bot stops, the open call is cancelled, the
  action's process group is killed, and one last UpdateBotSession reports status
  BOT_TERMINATING. It returns a running lease as CANCELLED with status UNAVAILABLE, so that
  the server requeues its job at once without counting a retry, or reports a finished one
  as COMPLETED. The server then closes the session.
"""

import asyncio
import contextlib

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2
from twisted.logger import Logger

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.bot.retry import (
    DEFAULT_SERVER_KEEPALIVE_SECONDS,
    RESULT_RETRY_MARGIN_SECONDS,
    Backoff,
    sleep,
)
from bgrid.errors import make_status

# Deadline of each UpdateBotSession call, in seconds. bgrid's server keeps an idle bot's call
# open for at most 20 s by default (--max-long-poll), so this leaves it time to respond.
POLL_TIMEOUT_SECONDS = 30.0

# Deadline in seconds of the last UpdateBotSession call of a stopping bot. When the call
# fails or times out, the server closes the session after its keepalive timeout instead.
STOP_REPORT_TIMEOUT_SECONDS = 5.0

# NOT_FOUND responses for the session in a row after which the bot waits before it creates
# the next session. Another bot with the same bot id closes the session each time it
# creates its own, and without a pause the two would do so in a tight loop.
NOT_FOUND_BEFORE_BACKOFF = 3

# Status codes of a failed CreateBotSession that end the bot instead of being retried,
# because they come from a configuration that no retry fixes. bgrid returns INVALID_ARGUMENT
# for an instance name that it does not serve and for an invalid bot id or worker, and a
# server may return NOT_FOUND for an unknown instance. PERMISSION_DENIED and UNAUTHENTICATED
# mean that the bot lacks credentials, and UNIMPLEMENTED that the server has no Bots service.
# Every other code is retried with backoff, such as UNAVAILABLE and DEADLINE_EXCEEDED while
# the server starts or restarts. Failures of UpdateBotSession never end the bot.
PERMANENT_CREATE_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
})

# Range in seconds of keepalive timeouts that a bot accepts from the server's expire_time.
# Values outside it come from clocks that disagree, and the bot keeps its earlier value.
PLAUSIBLE_KEEPALIVE_SECONDS = (1.0, 86400.0)


class SessionRejectedError(Exception):
    """The server rejected CreateBotSession with a code in PERMANENT_CREATE_CODES."""

    def __init__(self, bot_id, instance_name, error):
        self.code = error.code()
        self.details = error.details()
        super().__init__(
            f"the server rejected the session of bot {bot_id} for instance "
            f"{instance_name!r}: {self.code.name}: {self.details}. Retrying cannot fix "
            f"this, so the bot stops; check --server, --instance and --name"
        )


class SessionLoop:
    """Keeps one bot session alive and runs the leases that the server assigns to it.

    ``execute(payload, lease_id, bot_id, result_retry_seconds=...)`` is a coroutine
    function returning a ``LeaseOutcome`` (see ``ActionExecutor.execute``); it is cancelled
    when the server cancels the lease. ``worker`` is the ``Worker`` message reported at
    session creation. Retry delays run on ``clock`` (an ``IReactorTime``): ``backoff`` for
    failed calls, ``not_found_backoff`` once the session was not found more than
    NOT_FOUND_BEFORE_BACKOFF times in a row. ``stop_report_timeout`` is the deadline in
    seconds of the last call when the loop is cancelled.

    A result is kept while its lease can still be valid on the server: uploads of outputs
    and reports of the completed lease are retried for the server's keepalive timeout plus
    RESULT_RETRY_MARGIN_SECONDS after they start to fail, unless the server returns
    NOT_FOUND for the session first. The keepalive is taken from the ``expire_time`` of the
    server's responses, DEFAULT_SERVER_KEEPALIVE_SECONDS until one arrives.
    """

    log = Logger()

    def __init__(self, stub, bot_id, instance_name, worker, version, execute, clock,
                 backoff=None, poll_timeout=POLL_TIMEOUT_SECONDS,
                 stop_report_timeout=STOP_REPORT_TIMEOUT_SECONDS, not_found_backoff=None):
        self.bot_id = bot_id
        self.session_name = None
        self._stub = stub
        self._instance_name = instance_name
        self._worker = worker
        self._version = version
        self._execute = execute
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._not_found_backoff = not_found_backoff or Backoff(initial=1.0, maximum=60.0)
        self._poll_timeout = poll_timeout
        self._stop_report_timeout = stop_report_timeout
        self._lease = None  # the bot's view of its lease: id, state, status, result
        self._task = None  # the asyncio task running the lease's action
        self._server_keepalive = DEFAULT_SERVER_KEEPALIVE_SECONDS
        # Seconds for which the current lease's result is retried, fixed when it is accepted.
        self._result_retry_seconds = None
        # Clock time of the first failed report of the completed lease, or None.
        self._report_failing_since = None
        self._not_found_in_row = 0

    @property
    def lease(self):
        """The bot's view of its current lease, a ``Lease`` message, or None."""
        return self._lease

    async def run(self):
        """Run until cancelled; then stop the running action and close the session.

        Raises SessionRejectedError when CreateBotSession fails with a code in
        PERMANENT_CREATE_CODES.
        """
        try:
            while True:
                try:
                    if self.session_name is None:
                        await self._create_session()
                        self._backoff.reset()
                    await self._update_session()
                    self._backoff.reset()
                except grpc.aio.AioRpcError as error:
                    if self.session_name is None and error.code() in PERMANENT_CREATE_CODES:
                        raise SessionRejectedError(
                            self.bot_id, self._instance_name, error
                        ) from None
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

        self._not_found_in_row = 0
        self._not_found_backoff.reset()
        if reported_state == bots_pb2.COMPLETED:
            self.log.info("bot {bot_id} reported lease {lease_id} as completed",
                          bot_id=self.bot_id, lease_id=self._lease.id)
            self._forget_lease()
        await self._apply(session)

    async def _handle_error(self, error):
        code = error.code()
        if code == grpc.StatusCode.NOT_FOUND and self.session_name is not None:
            await self._replace_session(error)
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.session_name is not None:
            # The server kept the long poll open past the bot's deadline, which is no failure,
            # unless the call carried a result that the server did not confirm.
            if self._reporting_result():
                self._count_report_failure(error, delay=0.0)
            return
        delay = self._backoff.next_delay()
        if self._reporting_result():
            self._count_report_failure(error, delay)
        else:
            self.log.warn(
                "bot {bot_id}: call to the server failed: {code}: {details}; retrying in "
                "{delay:.1f} s",
                bot_id=self.bot_id, code=code.name, details=error.details(), delay=delay,
            )
        await self._wait_before_retry(delay)

    async def _wait_before_retry(self, delay):
        """Wait ``delay`` seconds, or less if the running action ends first.

        The action's result is then reported at once: its outputs were uploaded, so the
        server is probably reachable again.
        """
        waiting = asyncio.ensure_future(sleep(self._clock, delay))
        try:
            if self._task is not None and not self._task.done():
                await asyncio.wait({waiting, self._task}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await waiting
        finally:
            waiting.cancel()

    async def _replace_session(self, error):
        """Drop the session that the server did not find, with its lease; wait if need be.

        From the (NOT_FOUND_BEFORE_BACKOFF + 1)-th NOT_FOUND in a row on, the bot waits
        ``not_found_backoff`` before it creates the next session.
        """
        self._not_found_in_row += 1
        session = self.session_name
        self.session_name = None
        await self._drop_lease("its session is gone")
        if self._not_found_in_row <= NOT_FOUND_BEFORE_BACKOFF:
            self.log.warn(
                "bot {bot_id}: session {session} was not found on the server ({details}); "
                "creating a new session",
                bot_id=self.bot_id, session=session, details=error.details(),
            )
            return
        delay = self._not_found_backoff.next_delay()
        self.log.warn(
            "bot {bot_id}: session {session} was not found on the server ({details}), "
            "{count} times in a row. Another bot may be using the same bot id: give each "
            "bot its own --name. Creating a new session in {delay:.1f} s",
            bot_id=self.bot_id, session=session, details=error.details(),
            count=self._not_found_in_row, delay=delay,
        )
        await sleep(self._clock, delay)

    def _reporting_result(self):
        return self._lease is not None and self._lease.state == bots_pb2.COMPLETED

    def _count_report_failure(self, error, delay):
        """Log a failed report of the completed lease; give the result up when its time is over.

        The result is kept for ``_result_retry_seconds`` after the first failed report.
        """
        now = self._clock.seconds()
        if self._report_failing_since is None:
            self._report_failing_since = now
        elapsed = now - self._report_failing_since
        remaining = self._result_retry_seconds - elapsed
        if remaining > 0:
            self.log.warn(
                "bot {bot_id}: reporting lease {lease_id} as completed failed: {code}: "
                "{details}; retrying in {delay:.1f} s, for up to {remaining:.0f} s more",
                bot_id=self.bot_id, lease_id=self._lease.id, code=error.code().name,
                details=error.details(), delay=delay, remaining=remaining,
            )
            return
        self.log.error(
            "bot {bot_id}: gave up reporting lease {lease_id} as completed after {elapsed:.0f} "
            "s of failures, the last {code}: {details}. Its result is lost, and the server "
            "requeues the job if session {session} is still open",
            bot_id=self.bot_id, lease_id=self._lease.id, elapsed=elapsed,
            code=error.code().name, details=error.details(), session=self.session_name,
        )
        self._forget_lease()

    def _learn_keepalive(self, session):
        """Take the server's keepalive timeout from a response's ``expire_time``."""
        if not session.HasField("expire_time"):
            return
        # NOTE: this subtracts the bot's clock from a time of the server's clock, so any
        # difference between the two clocks adds to the result. Only results outside
        # PLAUSIBLE_KEEPALIVE_SECONDS are recognized as wrong.
        keepalive = session.expire_time.ToNanoseconds() / 1e9 - self._clock.seconds()
        low, high = PLAUSIBLE_KEEPALIVE_SECONDS
        if low <= keepalive <= high:
            self._server_keepalive = keepalive

    # --- leases ----------------------------------------------------------------------------

    async def _apply(self, session):
        self._learn_keepalive(session)
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
        self._result_retry_seconds = self._server_keepalive + RESULT_RETRY_MARGIN_SECONDS
        self._report_failing_since = None
        self._task = asyncio.ensure_future(
            self._execute(lease.payload, lease.id, self.bot_id,
                          result_retry_seconds=self._result_retry_seconds)
        )

    def _forget_lease(self):
        """Forget the current lease and its task, without cancelling the task."""
        self._lease = None
        self._task = None
        self._report_failing_since = None

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
        self._forget_lease()

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
        self._forget_lease()
        await self._cancel_action(running)
        # A completed lease is usually dropped while its report waits as a long poll for the
        # server's response. The server has normally applied the report by then.
        log = self.log.debug if completed else self.log.info
        log("bot {bot_id} dropped lease {lease_id}: {reason}", bot_id=self.bot_id,
            lease_id=lease_id, reason=reason)
