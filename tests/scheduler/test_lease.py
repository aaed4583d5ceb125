"""Tests of the lease state machine."""

from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.scheduler.lease import Lease, LeaseTransitionError, action_payload
from tests.scheduler.helpers import capture_logs


class LeaseTransitionTests(unittest.TestCase):
    def test_pending_active_completed(self):
        lease = Lease("lease-1", "job-1", "botSessions/1")

        lease.acknowledge()
        self.assertEqual(lease.state, bots_pb2.ACTIVE)
        lease.complete()
        self.assertEqual(lease.state, bots_pb2.COMPLETED)

    def test_cancel_from_pending_and_active(self):
        pending = Lease("lease-1", "job-1", "botSessions/1")
        active = Lease("lease-2", "job-2", "botSessions/2", state=bots_pb2.ACTIVE)

        pending.cancel()
        active.cancel()

        self.assertEqual(pending.state, bots_pb2.CANCELLED)
        self.assertEqual(active.state, bots_pb2.CANCELLED)

    def test_illegal_transitions_rejected(self):
        cases = [
            (bots_pb2.PENDING, "complete"),
            (bots_pb2.ACTIVE, "acknowledge"),
            (bots_pb2.COMPLETED, "acknowledge"),
            (bots_pb2.COMPLETED, "complete"),
            (bots_pb2.COMPLETED, "cancel"),
            (bots_pb2.CANCELLED, "acknowledge"),
            (bots_pb2.CANCELLED, "complete"),
            (bots_pb2.CANCELLED, "cancel"),
        ]
        events = capture_logs(self)
        for state, transition in cases:
            with self.subTest(state=state, transition=transition):
                lease = Lease("lease-1", "job-1", "botSessions/1", state=state)

                error = self.assertRaises(LeaseTransitionError, getattr(lease, transition))

                self.assertEqual(lease.state, state)
                self.assertIn(transition, error.message)
                self.assertIn("lease-1", error.message)
        logged = [event for event in events if event.get("transition")]
        self.assertEqual(len(logged), len(cases))

    def test_to_proto_carries_payload(self):
        action = re_pb2.Action(do_not_cache=True)
        lease = Lease("lease-1", "job-1", "botSessions/1")

        message = lease.to_proto(action_payload(action), (("os", "linux"),))

        unpacked = re_pb2.Action()
        self.assertTrue(message.payload.Unpack(unpacked))
        self.assertEqual(unpacked, action)
        self.assertEqual(message.state, bots_pb2.PENDING)
        self.assertEqual(message.requirements.properties[0].key, "os")
