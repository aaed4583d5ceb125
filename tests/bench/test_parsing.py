"""Tests of the benchmark's parsers and data helpers, which need no server."""

from twisted.trial import unittest

from bench import bazel, load, null_server, scenarios, servers


class ParseServerSpecTest(unittest.TestCase):
    def test_command_with_commas(self):
        spec = servers.parse_server_spec("name=mine,cmd=serve --ports 1,2 {port},bot=bot --x=1,cleanup=rm -r a,b")

        self.assertEqual(spec.name, "mine")
        self.assertEqual(spec.command, "serve --ports 1,2 {port}")
        self.assertEqual(spec.bot, "bot --x=1")
        self.assertEqual(spec.cleanup, "rm -r a,b")

    def test_missing_command(self):
        with self.assertRaisesRegex(ValueError, "missing cmd"):
            servers.parse_server_spec("name=mine")

    def test_unknown_key(self):
        with self.assertRaisesRegex(ValueError, "invalid server field 'port=1'"):
            servers.parse_server_spec("port=1,name=mine,cmd=serve")

    def test_repeated_key(self):
        with self.assertRaisesRegex(ValueError, "name is given twice"):
            servers.parse_server_spec("name=a,cmd=serve,name=b")


class ExpandPresetsTest(unittest.TestCase):
    def test_group_all(self):
        names = [spec.name for spec in servers.expand_presets(["all"])]

        self.assertEqual(names, ["null", "bgrid", "buildgrid"])

    def test_unknown_preset(self):
        with self.assertRaisesRegex(ValueError, "unknown preset 'nope'"):
            servers.expand_presets(["nope"])


class PercentileTest(unittest.TestCase):
    def test_nearest_rank(self):
        latencies = [i / 1000 for i in range(1, 101)]

        self.assertEqual(load.percentile_ms(latencies, 0.50), 50.0)
        self.assertEqual(load.percentile_ms(latencies, 0.99), 99.0)

    def test_single_and_empty(self):
        self.assertEqual(load.percentile_ms([0.002], 0.99), 2.0)
        self.assertIsNone(load.percentile_ms([], 0.5))


class UniqueBlobsTest(unittest.TestCase):
    def test_digests_match_data(self):
        blobs = load.UniqueBlobs()
        for size in (16, 4096, scenarios.BYTESTREAM_CHUNK_BYTES + 5):
            digest, data = blobs.make(size)
            self.assertEqual(len(data), size)
            self.assertEqual(load.digest_of(data), digest)

    def test_blobs_differ(self):
        blobs = load.UniqueBlobs()

        self.assertNotEqual(blobs.make(4096)[0].hash, blobs.make(4096)[0].hash)

    def test_chunks_join_to_blob(self):
        blobs = load.UniqueBlobs()
        chunk = scenarios.BYTESTREAM_CHUNK_BYTES
        for size in (16, chunk, chunk + 8, chunk + 16, 3 * chunk):
            digest, filler, suffix = blobs.make_parts(size)
            chunks = list(scenarios.blob_chunks(filler, suffix))
            self.assertEqual(load.digest_of(b"".join(chunks)), digest, f"size {size}")
            self.assertTrue(all(len(part) <= chunk for part in chunks), f"size {size}")


class CountRemoteSpawnsTest(unittest.TestCase):
    def test_remote_execution(self):
        self.assertEqual(bazel.count_remote_spawns("INFO: 30 processes: 14 internal, 16 remote.\n"), 16)

    def test_cache_hits(self):
        output = "INFO: 3 processes: 3 remote.\nINFO: 30 processes: 16 remote cache hit, 14 internal.\n"

        self.assertEqual(bazel.count_remote_spawns(output), 16)

    def test_no_summary(self):
        self.assertEqual(bazel.count_remote_spawns("ERROR: build failed\n"), 0)


class NullServerResourceNameTest(unittest.TestCase):
    def test_sizes(self):
        self.assertEqual(null_server.blob_size_from_resource_name("blobs/abc/42"), 42)
        self.assertEqual(null_server.blob_size_from_resource_name("main/x/blobs/abc/7"), 7)

    def test_invalid(self):
        with self.assertRaisesRegex(ValueError, "invalid resource name"):
            null_server.blob_size_from_resource_name("blobs/abc")
