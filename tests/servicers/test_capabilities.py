"""Tests of the Capabilities service through a real gRPC server."""

import grpc

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.servicers.support import INSTANCE_NAMES, MAX_BATCH_TOTAL_SIZE_BYTES, ServicerTestCase
from tests.util import async_test


class GetCapabilitiesTests(ServicerTestCase):
    @async_test
    async def test_cache_capabilities(self):
        response = await self.capabilities.GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name="main")
        )

        cache = response.cache_capabilities
        self.assertEqual(list(cache.digest_functions), [re_pb2.DigestFunction.SHA256])
        self.assertTrue(cache.action_cache_update_capabilities.update_enabled)
        self.assertEqual(cache.max_batch_total_size_bytes, MAX_BATCH_TOTAL_SIZE_BYTES)
        self.assertEqual(
            cache.symlink_absolute_path_strategy, re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
        )
        self.assertEqual(list(cache.supported_compressors), [])
        self.assertEqual(list(cache.supported_batch_update_compressors), [])
        self.assertFalse(cache.split_blob_support)
        self.assertFalse(cache.splice_blob_support)

    @async_test
    async def test_execution_capabilities(self):
        response = await self.capabilities.GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name="main")
        )

        execution = response.execution_capabilities
        self.assertTrue(execution.exec_enabled)
        self.assertEqual(execution.digest_function, re_pb2.DigestFunction.SHA256)
        self.assertEqual(list(execution.digest_functions), [re_pb2.DigestFunction.SHA256])

    @async_test
    async def test_every_priority_accepted(self):
        response = await self.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())

        for capabilities in (
            response.execution_capabilities.execution_priority_capabilities,
            response.cache_capabilities.cache_priority_capabilities,
        ):
            self.assertEqual(len(capabilities.priorities), 1)
            self.assertEqual(capabilities.priorities[0].min_priority, -(2**31))
            self.assertEqual(capabilities.priorities[0].max_priority, 2**31 - 1)

    @async_test
    async def test_api_versions(self):
        response = await self.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())

        self.assertEqual((response.low_api_version.major, response.low_api_version.minor), (2, 0))
        self.assertEqual((response.high_api_version.major, response.high_api_version.minor), (2, 3))
        self.assertEqual(
            (response.deprecated_api_version.major, response.deprecated_api_version.minor), (2, 0)
        )

    @async_test
    async def test_every_instance_name(self):
        for instance_name in INSTANCE_NAMES:
            response = await self.capabilities.GetCapabilities(
                re_pb2.GetCapabilitiesRequest(instance_name=instance_name)
            )
            self.assertTrue(response.HasField("cache_capabilities"), instance_name)

    @async_test
    async def test_unknown_instance(self):
        await self.assert_rpc_error(
            self.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="other")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'other'",
        )
