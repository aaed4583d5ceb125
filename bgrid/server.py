"""The service tree of a bgrid node: storage, scheduler, gRPC server and local bots.

Nothing here opens a file, a database or a socket before ``startService``: twistd forks
to daemonize between building the tree and starting it, and neither an LMDB environment
nor gRPC's core may cross a fork.
"""

import ctypes
import ctypes.util
import fcntl
import gc
import os
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from google.longrunning import operations_grpc_pb2
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.asyncioreactor import AsyncioSelectorReactor
from twisted.logger import Logger
from twisted.runner.procmon import ProcessMonitor

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc as re_pb2_grpc,
)
from bgrid._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from bgrid.bridge import as_deferred
from bgrid.execution import ExecutionController
from bgrid.scheduler.scheduler import Scheduler
from bgrid.scheduler.store import LmdbSchedulerStore
from bgrid.servicers.action_cache import ActionCacheServicer
from bgrid.servicers.base import InstanceNames
from bgrid.servicers.bots import BotsServicer
from bgrid.servicers.bytestream import ByteStreamServicer
from bgrid.servicers.capabilities import CapabilitiesServicer
from bgrid.servicers.cas import ContentAddressableStorageServicer
from bgrid.servicers.execution import ExecutionServicer
from bgrid.servicers.operations import OperationsServicer
from bgrid.storage.factory import build_storage

# Room in a gRPC message, in bytes, beyond the largest batch of blob data and the entries
# of its blobs: headers, and ByteStream chunks.
MESSAGE_SIZE_MARGIN = 2**20

# The gRPC message limit leaves room for one batch entry per this many bytes of blob data.
# An entry (digest, status and framing) takes at most about 90 bytes, so a full batch of
# blobs of this size or larger fits whole. A batch of smaller blobs may exceed the limit,
# and gRPC then rejects it with RESOURCE_EXHAUSTED before bgrid sees it.
SMALLEST_FITTING_BLOB = 32
BATCH_ENTRY_OVERHEAD = 96

# Seconds that calls in progress get to finish when the server stops.
SHUTDOWN_GRACE = 10.0

# Bytes that each incoming gRPC stream may buffer before its client waits for the server
# to read them (the HTTP/2 stream window): one ByteStream chunk. gRPC's bandwidth-delay
# probing is turned off because it grows these windows with no bound that bgrid sets.
# With probing on, 20 concurrent ByteStream uploads of 64 MiB took the server to 0.8 to
# 1.1 GiB of resident memory, and with this window to 240 to 250 MiB (2-core VM,
# loopback). The cost: a client 20 ms away gets at most about 50 MB/s from one stream.
STREAM_WINDOW_BYTES = 2**20

SERVICE_NAMES = (
    re_pb2.DESCRIPTOR.services_by_name["Execution"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
    bots_pb2.DESCRIPTOR.services_by_name["Bots"].full_name,
    "google.longrunning.Operations",
)


# glibc's mallopt option for the maximum number of malloc arenas (malloc.h), and the
# number bgrid sets (see limit_malloc_arenas).
M_ARENA_MAX = -8
MALLOC_ARENAS = 2

# Seconds the local bot gets to give its leases back after SIGTERM before it is killed.
LOCAL_BOT_STOP_TIMEOUT = 10.0

# Seconds between two checks of whether the local bot has exited, while the daemon stops.
LOCAL_BOT_EXIT_POLL = 0.1


class StartupError(Exception):
    """A reason the daemon cannot start that its message explains without a traceback."""


class LocalBotMonitor(ProcessMonitor):
    """The ``ProcessMonitor`` of the local bot process, which restarts it when it dies, and
    whose ``stopService`` waits until the process has exited."""

    def __init__(self, reactor):
        super().__init__(reactor=reactor)
        self.killTime = LOCAL_BOT_STOP_TIMEOUT

    def stopService(self):
        """Send SIGTERM to the bot, SIGKILL after ``killTime``, and return a Deferred that
        fires once it has exited."""
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        return defer.Deferred.fromCoroutine(self._wait_for_exit())

    async def _wait_for_exit(self):
        # ProcessMonitor offers no exit notification, so its table of live processes is
        # checked until the bot is gone.
        while self.protocols:
            await task.deferLater(self._clock, LOCAL_BOT_EXIT_POLL, lambda: None)


class BgridService(service.MultiService):
    """One bgrid node. Its children (local bots) start after the gRPC server is serving."""

    log = Logger()

    def __init__(self, config, reactor=None):
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.storage = None
        self.scheduler = None
        self.grpc_server = None
        self.bytestream = None
        self.health = None
        self.data_dir_lock = None
        self.local_bots = None
        self.ports = []
        self.ready = defer.Deferred()

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self):
        service.Service.startService(self)
        # Before the storage and gRPC threads exist, so that none gets an arena of its own.
        limit_malloc_arenas()
        starting = defer.Deferred.fromCoroutine(self._start())
        starting.addCallbacks(self._serving, self._start_failed)

    async def _start(self):
        config = self.config
        if not isinstance(self.reactor, AsyncioSelectorReactor):
            raise StartupError(
                f"bgrid needs Twisted's asyncio reactor, not {type(self.reactor).__name__}: "
                f"build the service through bgrid.tap.Options, which installs it"
            )

        os.makedirs(config.data_dir, exist_ok=True)
        self.data_dir_lock = lock_data_dir(config.data_dir)
        self.storage = build_storage(
            data_dir=os.path.join(config.data_dir, "lmdb"),
            map_size=config.map_size,
            clock=self.reactor,
            max_cas_size=config.max_cas_size,
            cas_low_watermark=config.cas_low_watermark,
        )
        await self.storage.start()

        controller = None
        self.scheduler = Scheduler(
            self.reactor,
            result_handler=lambda *args: controller.handle_result(*args),
            bot_keepalive_timeout=config.bot_keepalive_timeout,
            max_long_poll=config.max_long_poll,
            max_job_retries=config.max_job_retries,
            operation_retention=config.operation_retention,
            max_action_timeout=config.max_action_timeout,
            action_timeout_grace=config.action_timeout_grace,
            store=LmdbSchedulerStore(self.storage.environment),
        )
        controller = ExecutionController(
            self.storage.blob_store, self.storage.action_cache, self.scheduler
        )
        # After the controller exists, because recovery passes reported results to it.
        await self.scheduler.recover()
        self._build_grpc_server(controller)
        await as_deferred(self.grpc_server.start())

    def _build_grpc_server(self, controller):
        config = self.config
        entries = config.max_batch_size // SMALLEST_FITTING_BLOB
        message_limit = (
            config.max_batch_size + entries * BATCH_ENTRY_OVERHEAD + MESSAGE_SIZE_MARGIN
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            ]
        )
        instance_names = InstanceNames(config.instance_names)
        blob_store = self.storage.blob_store
        action_cache = self.storage.action_cache

        re_pb2_grpc.add_CapabilitiesServicer_to_server(
            CapabilitiesServicer(
                instance_names, config.max_batch_size, max_cas_blob_size_bytes=config.max_cas_size
            ),
            server,
        )
        re_pb2_grpc.add_ContentAddressableStorageServicer_to_server(
            ContentAddressableStorageServicer(instance_names, blob_store, config.max_batch_size),
            server,
        )
        self.bytestream = ByteStreamServicer(instance_names, blob_store, self.reactor)
        bytestream_pb2_grpc.add_ByteStreamServicer_to_server(self.bytestream, server)
        re_pb2_grpc.add_ActionCacheServicer_to_server(
            ActionCacheServicer(instance_names, action_cache, blob_store), server
        )
        re_pb2_grpc.add_ExecutionServicer_to_server(
            ExecutionServicer(instance_names, controller, self.scheduler), server
        )
        operations_grpc_pb2.add_OperationsServicer_to_server(
            OperationsServicer(instance_names, self.scheduler), server
        )
        bots_pb2_grpc.add_BotsServicer_to_server(
            BotsServicer(instance_names, self.scheduler, self.reactor), server
        )

        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

        self.ports = []
        for address in config.listen:
            try:
                port = server.add_insecure_port(address)
            except RuntimeError as error:
                # grpcio raises RuntimeError when it cannot bind; older releases return 0.
                port = 0
                reason = str(error)
            else:
                reason = "the address is taken or invalid"
            if port == 0 and not address.startswith("unix:"):
                raise StartupError(f"cannot listen on {address}: {reason}")
            self.ports.append((address, port))
        self.grpc_server = server

    async def _set_health(self, status):
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, status)

    def _serving(self, _=None):
        freeze_startup_objects()
        for address, port in self.ports:
            self.log.info("serving REAPI on {address} (port {port})", address=address, port=port)
        as_deferred(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        self._start_local_bots()
        service.MultiService.startService(self)
        self.ready.callback(self.ports)

    def _start_failed(self, failure):
        if failure.check(StartupError):
            self.log.critical("bgrid failed to start: {error}", error=failure.value)
        else:
            self.log.failure("bgrid failed to start", failure)
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)

        # Stop cleanly, then exit with a failure status so that a supervisor such as
        # systemd's Restart=on-failure sees that the start failed. The failure may come
        # before the reactor runs.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _start_local_bots(self):
        if not self.config.local_bots:
            return
        address, port = self.ports[0]
        server_address = local_address(address, port)
        command = [
            sys.executable,
            "-m",
            "bgrid",
            "bot",
            "--server",
            server_address,
            "--work-dir",
            os.path.join(os.path.abspath(self.config.data_dir), "local-bots"),
            "--concurrency",
            str(self.config.local_bots),
            "--name",
            "local",
        ]
        if self.config.instance_names[0]:
            command += ["--instance", self.config.instance_names[0]]
        for prop in self.config.local_bot_properties:
            command += ["--property", prop]
        self.local_bots = LocalBotMonitor(reactor=self.reactor)
        self.local_bots.addProcess("local-bots", command, env=dict(os.environ))
        self.local_bots.setServiceParent(self)

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        self.log.info("bgrid stopping")
        # The local bot reports its leases as given back while the server still takes
        # calls, so a restart does not count them as retries.
        if self.local_bots is not None:
            await self.local_bots.stopService()
        await service.MultiService.stopService(self)
        if self.grpc_server is not None:
            await as_deferred(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
            # The server refuses new calls from here on and gives calls in progress the
            # grace period; stopping the scheduler meanwhile ends long polls and Execute
            # streams at once, with UNAVAILABLE, so they need not use up the grace period.
            stopping = as_deferred(self.grpc_server.stop(SHUTDOWN_GRACE))
            self.log.info(
                "bgrid refuses new calls; calls in progress get {grace} s", grace=SHUTDOWN_GRACE
            )
            if self.scheduler is not None:
                await self.scheduler.stop()
            await stopping
            self.bytestream.close()
        elif self.scheduler is not None:
            await self.scheduler.stop()
        if self.storage is not None:
            await self.storage.stop()
        if self.data_dir_lock is not None:
            self.data_dir_lock.close()
        self.log.info("bgrid stopped")


def limit_malloc_arenas():
    """Make glibc's malloc share MALLOC_ARENAS arenas among all threads.

    By default a thread that allocates while other threads have locked every arena gets
    a new one, up to eight per core, and each arena keeps the memory freed into it. Upload buffers are
    allocated on gRPC's and the storage threads and freed on others, so with 20 concurrent
    64 MiB ByteStream uploads (``python -m bench --scenario bs-write``, 2-core VM) the
    daemon peaked at 303 to 314 MiB of resident memory, and at 271 MiB with two arenas,
    for the same CPU per upload. Does nothing where the C library lacks ``mallopt`` or
    where ``MALLOC_ARENA_MAX`` is set in the environment, which takes precedence.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    library = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
    if mallopt is not None:
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def freeze_startup_objects():
    """Move the objects built at startup out of the garbage collector's reach.

    A FindMissingBlobs of 1,000 digests allocates about 3,000 tracked objects, so each
    call starts several collections, and a full collection traverses every tracked
    object, including the modules, servicers and descriptors loaded at startup. Measured
    with the fmb scenario of ``python -m bench`` on a 2-core VM, over four runs each:
    1.91 ms of server CPU per call on average with the freeze, 2.08 ms without.
    """
    # NOTE: a threshold of 10,000 instead of 700 for the youngest generation saved a
    # little more CPU in fmb. But the daemon then peaked at 800 MiB of resident memory
    # instead of 180 MiB in the 1 MiB case of bs-write, likely because garbage cycles
    # that hold upload buffers wait longer for a collection. The default thresholds
    # are therefore kept.
    gc.collect()
    gc.freeze()


def lock_data_dir(data_dir):
    """Lock ``data_dir`` for this process and return the open lock file.

    Two daemons on one LMDB environment would each run their own scheduler over the same
    records, so a second one is refused with the pid of the first.
    """
    path = os.path.join(data_dir, "bgrid.lock")
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise StartupError(
            f"data directory {data_dir} is in use by another bgrid daemon (pid {holder}); "
            f"stop it or choose another --data-dir"
        ) from None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def local_address(listen_address, port):
    """Return the address a bot on this host uses to reach a ``--listen`` address."""
    if listen_address.startswith("unix:"):
        return listen_address
    host = listen_address.rsplit(":", 1)[0]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "[::]":
        host = "[::1]"
    return f"{host}:{port}"
