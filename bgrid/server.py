"""The service tree of a bgrid node: storage, scheduler, gRPC server and local bots.

Nothing here opens a file, a database or a socket before ``startService``: twistd forks
to daemonize between building the tree and starting it, and neither an LMDB environment
nor gRPC's core may cross a fork.
"""

import os
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from google.longrunning import operations_grpc_pb2
from twisted.application import service
from twisted.internet import defer
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

# Room in a gRPC message, in bytes, beyond the largest batch of blob data: digests,
# statuses and framing of many small blobs, and ByteStream chunks.
MESSAGE_SIZE_MARGIN = 4 * 2**20

# Seconds that calls in progress get to finish when the server stops.
SHUTDOWN_GRACE = 10.0

SERVICE_NAMES = (
    re_pb2.DESCRIPTOR.services_by_name["Execution"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
    bots_pb2.DESCRIPTOR.services_by_name["Bots"].full_name,
    "google.longrunning.Operations",
)


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
        starting = defer.Deferred.fromCoroutine(self._start())
        starting.addCallbacks(self._serving, self._start_failed)

    async def _start(self):
        config = self.config

        os.makedirs(config.data_dir, exist_ok=True)
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
        message_limit = config.max_batch_size + MESSAGE_SIZE_MARGIN
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.bdp_probe", 0),
            ]
        )
        instance_names = InstanceNames(config.instance_names)
        blob_store = self.storage.blob_store
        action_cache = self.storage.action_cache

        re_pb2_grpc.add_CapabilitiesServicer_to_server(
            CapabilitiesServicer(instance_names, config.max_batch_size), server
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
            port = server.add_insecure_port(address)
            if port == 0 and not address.startswith("unix:"):
                raise OSError(f"cannot listen on {address}: the address is taken or invalid")
            self.ports.append((address, port))
        self.grpc_server = server

    async def _set_health(self, status):
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, status)

    def _serving(self, _=None):
        for address, port in self.ports:
            self.log.info("serving REAPI on {address} (port {port})", address=address, port=port)
        as_deferred(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        self._start_local_bots()
        service.MultiService.startService(self)
        self.ready.callback(self.ports)

    def _start_failed(self, failure):
        self.log.failure("bgrid failed to start", failure)
        self.ready.errback(failure)
        self.reactor.stop()

    def _start_local_bots(self):
        if not self.config.local_bots:
            return
        address, port = self.ports[0]
        if address.startswith("unix:"):
            server_address = address
        else:
            server_address = f"127.0.0.1:{port}"
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
        monitor = ProcessMonitor(reactor=self.reactor)
        monitor.addProcess("local-bots", command, env=dict(os.environ))
        monitor.setServiceParent(self)

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        self.log.info("bgrid stopping: no new calls accepted")
        await service.MultiService.stopService(self)
        if self.grpc_server is not None:
            await as_deferred(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
            await as_deferred(self.grpc_server.stop(SHUTDOWN_GRACE))
            self.bytestream.close()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.storage is not None:
            await self.storage.stop()
        self.log.info("bgrid stopped")
