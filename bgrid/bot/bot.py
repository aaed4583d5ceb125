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
    """The bot's directory: ``cache/`` for blobs, ``build/`` for per-lease exec roots, and
    a ``lock`` file that keeps a second bot out while this one runs."""

    log = Logger()

    def __init__(self, path, lock_file):
        self.path = path
        self.cache = os.path.join(path, "cache")
        self.build = os.path.join(path, "build")
        self._lock_file = lock_file

    @classmethod
    def open(cls, path):
        """Create and lock ``path`` and empty its ``build/`` directory.

        Raises WorkDirectoryBusyError when another bot holds the lock, and OSError when the
        directory cannot be created or written.
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

    ``start`` begins work on the running event loop; ``stop`` cancels every session and
    action and returns a Deferred that fires when all is cleaned up.
    """

    log = Logger()

    def __init__(self, config, work_directory, clock):
        self.config = config
        self.work_directory = work_directory
        self._clock = clock
        self._task = None
        self.sessions = []

    def start(self):
        """Start the bot; return a Deferred that fires when it stops, or fails with its error."""
        self._task = asyncio.ensure_future(self._run())
        return as_deferred(self._task)

    def stop(self):
        """Cancel every session and running action; return a Deferred that fires when done."""
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
            executor = ActionExecutor(cas, cache, self.work_directory.build, config.name, self._clock)
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
                await asyncio.gather(*tasks)
            finally:
                for session_task in tasks:
                    session_task.cancel()
                await asyncio.wait(tasks)
        finally:
            await channel.close()
            self.log.info("bot {name} stopped", name=config.name)
