"""The REAPI Capabilities service: what this server's CAS, action cache and execution
service support, so clients can configure themselves."""

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid._protos.build.bazel.semver import semver_pb2
from bgrid.servicers.base import unary_handler

# The REAPI versions whose features bgrid implements. Version 2.3 added
# ExecutedActionMetadata.virtual_execution_duration, the newest feature in our proto.
LOW_API_VERSION = semver_pb2.SemVer(major=2, minor=0)
HIGH_API_VERSION = semver_pb2.SemVer(major=2, minor=3)

ANY_PRIORITY = re_pb2.PriorityCapabilities(
    priorities=[re_pb2.PriorityCapabilities.PriorityRange(min_priority=-(2**31), max_priority=2**31 - 1)]
)


class CapabilitiesServicer(remote_execution_pb2_grpc.CapabilitiesServicer):
    """Serves ``GetCapabilities`` for every configured instance name.

    ``max_batch_total_size_bytes`` must be the limit that the CAS servicer enforces, and
    the gRPC server's maximum message lengths must leave room for a batch of that size.
    ``max_cas_blob_size_bytes`` is the largest blob the store accepts (0: no limit).
    """

    def __init__(
        self,
        instance_names,
        max_batch_total_size_bytes,
        max_cas_blob_size_bytes=0,
        execution_enabled=True,
    ):
        self._instance_names = instance_names
        self._capabilities = _build_capabilities(
            max_batch_total_size_bytes, max_cas_blob_size_bytes, execution_enabled
        )

    @unary_handler
    async def GetCapabilities(self, request, context):
        self._instance_names.check(request.instance_name)
        response = re_pb2.ServerCapabilities()
        response.CopyFrom(self._capabilities)
        return response


def _build_capabilities(max_batch_total_size_bytes, max_cas_blob_size_bytes, execution_enabled):
    sha256 = re_pb2.DigestFunction.SHA256
    cache = re_pb2.CacheCapabilities(
        digest_functions=[sha256],
        action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(update_enabled=True),
        max_batch_total_size_bytes=max_batch_total_size_bytes,
        # The bot rejects input symlinks with absolute targets, because they could point
        # outside the exec root.
        symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
        max_cas_blob_size_bytes=max_cas_blob_size_bytes,
        # ResultsCachePolicy.priority is accepted and ignored.
        cache_priority_capabilities=ANY_PRIORITY,
        # No compressors (supported_compressors, supported_batch_update_compressors) and
        # no SplitBlob or SpliceBlob: the fields keep their empty defaults.
    )
    execution = re_pb2.ExecutionCapabilities(
        digest_function=sha256,
        digest_functions=[sha256],
        exec_enabled=execution_enabled,
        # The scheduler orders jobs by any int32 ExecutionPolicy.priority, smaller first.
        execution_priority_capabilities=ANY_PRIORITY,
    )
    return re_pb2.ServerCapabilities(
        cache_capabilities=cache,
        execution_capabilities=execution,
        deprecated_api_version=LOW_API_VERSION,
        low_api_version=LOW_API_VERSION,
        high_api_version=HIGH_API_VERSION,
    )
