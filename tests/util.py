"""Helpers shared by bgrid's trial tests, which run on Twisted's asyncio reactor."""

import functools
import shutil
import tempfile

from bgrid.bridge import as_deferred


def async_test(test_method):
    """Let a trial test method be an ``async def`` that awaits asyncio futures.

    Trial waits on the returned Deferred, so grpc.aio calls and ``as_future`` of
    Deferreds can be awaited inside the test.
    """

    @functools.wraps(test_method)
    def run(self, *args, **kwargs):
        return as_deferred(test_method(self, *args, **kwargs))

    return run


def make_temp_dir(test_case, prefix="bgrid-test-"):
    """Create a temporary directory that is removed when ``test_case`` ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    test_case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path
