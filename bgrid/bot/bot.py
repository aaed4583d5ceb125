"""The bot: its work directory, and one bot session per concurrency slot sharing one
channel, one CAS client and one blob cache."""

import asyncio
import fcntl
import importlib.metadata
import os
from dataclasses import dataclass, field

from twisted.logger import Logger

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2_grpc, worker_pb2
from bgrid.bot.cache import BlobCache
from bgrid.bot.executor import ActionExecutor
from bgrid.bot.processes import ProcessGroupRecords
from bgrid.bot.session import SessionLoop
from bgrid.bot.staging import remove_tree
from bgrid.bridge import as_deferred
from bgrid.client.cas import CasClient
from bgrid.client.channel import open_channel


def _bot_version():
    try:
        return f"bgrid-bot/{importlib.metadata.version('bgrid')}"
    except importlib.metadata.PackageNotFoundError:
        return "bgrid-bot/unknown"


BOT_VERSION = _bot_version()


class WorkDirectoryBusyError(Exception):
    """Another bot has locked the work directory."""


class WorkDirectory:
    """The bot's directory: ``cache/`` for blobs, ``build/`` for per-lease exec roots,
    ``processes/`` for the records of running actions' process groups, and a ``lock`` file
    that keeps a second bot out while this one runs."""

    log = Logger()

    def __init__(self, path, lock_file):
        self.path = path
        self.cache = os.path.join(path, "cache")
        self.build = os.path.join(path, "build")
        self.process_groups = ProcessGroupRecords(os.path.join(path, "processes"))
        self._lock_file = lock_file

    @classmethod
    def open(cls, path):
        """Create and lock ``path``, kill what an earlier bot left running, empty ``build/``.

        The processes killed are those of the process groups recorded in ``processes/``
        by an earlier bot that did not stop cleanly. Raises WorkDirectoryBusyError when
        another bot holds the lock, and OSError when the directory cannot be created or
        written.
        """
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        lock_file = open(os.path.join(path, "lock"), "a")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise WorkDirectoryBusyError(
                f"work directory {path!r} is in use by another bot; give each bot its own "
                f"--work-dir"
            ) from None
        directory = cls(path, lock_file)
        os.makedirs(directory.process_groups.directory, exist_ok=True)
        # Before the exec roots are removed, because the processes may still write there.
        directory.process_groups.kill_leftovers()
        # Exec roots left by a bot that did not stop cleanly.
        remove_tree(directory.build)
        os.makedirs(directory.build)
        os.makedirs(directory.cache, exist_ok=True)
        return directory

    def close(self):
        """Release the lock."""
        self._lock_file.close()


@dataclass
class BotConfig:
    """The settings of one bot process."""

    server: str
    name: str
    concurrency: int
    cache_max_bytes: int
    instance_name: str = ""
    # Platform properties as (name, value) pairs, reported as worker properties.
    properties: list = field(default_factory=list)


class Bot:
    """Runs ``config.concurrency`` bot sessions, ``{name}.0`` to ``{name}.{N-1}``.

    ``start`` begins work on the running event loop. ``stop`` stops taking leases, kills
    the running actions and returns their leases to the server, and returns a Deferred that
    fires when all is cleaned up (see ``bgrid.bot.session``).
    """

    log = Logger()

    def __init__(self, config, work_directory, clock):
        self.config = config
        self.work_directory = work_directory
        self._clock = clock
        self._task = None
        self.sessions = []

    def start(self):
        """Start the bot; return a Deferred that fires when it stops, or fails with its error.

        The error is ``bgrid.bot.session.SessionRejectedError`` when the server rejects the
        bot's sessions for good, as for an instance name that it does not serve.
        """
        self._task = asyncio.ensure_future(self._run())
        return as_deferred(self._task)

    def stop(self):
        """Stop every session and running action; return a Deferred that fires when done.

        Each session makes one last call to the server, which takes at most
        ``bgrid.bot.session.STOP_REPORT_TIMEOUT_SECONDS``.
        """
        if self._task is None or self._task.done():
            return as_deferred(asyncio.sleep(0))
        self._task.cancel()
        return as_deferred(asyncio.wait({self._task}))

    async def _run(self):
        config = self.config
        channel = open_channel(config.server)
        try:
            cas = CasClient(channel, config.instance_name)
            cache = BlobCache(self.work_directory.cache, config.cache_max_bytes, cas)
            await asyncio.to_thread(cache.load)
            executor = ActionExecutor(
                cas, cache, self.work_directory.build, config.name, self._clock,
                process_groups=self.work_directory.process_groups,
            )
            stub = bots_pb2_grpc.BotsStub(channel)
            worker = worker_pb2.Worker(
                properties=[
                    worker_pb2.Worker.Property(key=name, value=value)
                    for name, value in config.properties
                ]
            )
            self.sessions = [
                SessionLoop(
                    stub, f"{config.name}.{slot}", config.instance_name, worker, BOT_VERSION,
                    executor.execute, self._clock,
                )
                for slot in range(config.concurrency)
            ]
            self.log.info(
                "bot {name} started with {concurrency} sessions against {server}, "
                "instance {instance!r}",
                name=config.name, concurrency=config.concurrency, server=config.server,
                instance=config.instance_name,
            )
            tasks = [asyncio.ensure_future(session.run()) for session in self.sessions]
            try:
                # Sessions run until cancelled, so one that returns has failed, as with
                # SessionRejectedError, which ends the bot.
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for session_task in done:
                    session_task.result()
            finally:
                # Each session is cancelled once, because a second cancellation would cut
                # off its last report to the server. asyncio.gather is not used: it returns
                # when the first cancelled session ends, before the others have reported.
                for session_task in tasks:
                    session_task.cancel()
                await asyncio.wait(tasks)
                # Only the first error is raised above. The other sessions usually failed the
                # same way, and reading their errors keeps asyncio from logging each of them.
                for session_task in tasks:
                    if not session_task.cancelled():
                        session_task.exception()
        finally:
            await channel.close()
            self.log.info("bot {name} stopped", name=config.name)
