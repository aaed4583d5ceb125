"""Leases, the assignment of one job to one bot session, and their state machine.

The states are those of ``google.devtools.remoteworkers.v1test2.LeaseState``. The server
creates a lease PENDING. The bot acknowledges it (ACTIVE) and later completes it
(COMPLETED). The server may cancel a PENDING or ACTIVE lease (CANCELLED), either because
every client cancelled the job or because the bot went away and the job is requeued.
No other transition exists.
"""

from google.protobuf import any_pb2
from twisted.logger import Logger

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.errors import BgridError

PENDING = bots_pb2.PENDING
ACTIVE = bots_pb2.ACTIVE
COMPLETED = bots_pb2.COMPLETED
CANCELLED = bots_pb2.CANCELLED

# Transition name -> (states it may start from, state it leads to).
TRANSITIONS = {
    "acknowledge": (frozenset({PENDING}), ACTIVE),
    "complete": (frozenset({ACTIVE}), COMPLETED),
    "cancel": (frozenset({PENDING, ACTIVE}), CANCELLED),
}


def state_name(state):
    """Return the ``LeaseState`` enum name of ``state``, or the number if it has none."""
    try:
        return bots_pb2.LeaseState.Name(state)
    except ValueError:
        return str(state)


def action_payload(action):
    """Return the lease payload for an ``re_pb2.Action``: an ``Any`` packing the Action.

    Sending the Action itself saves the bot a CAS read. Other servers send an ``Any``
    packing the action's ``Digest``, so bots should accept both.
    """
    payload = any_pb2.Any()
    payload.Pack(action)
    return payload


class LeaseTransitionError(BgridError):
    """A lease was asked to make a transition that its state machine does not allow.

    It marks a scheduler bug or a corrupt record, so its gRPC code is INTERNAL.
    """


class Lease:
    """One job assigned to one bot session.

    ``state`` changes only through the named transition methods, each of which raises
    LeaseTransitionError and leaves the state as it was when the transition is illegal.
    ``started_time`` is the clock time at which the bot acknowledged the lease, or None
    before that.
    """

    log = Logger()

    def __init__(self, lease_id, job_id, session_name, state=PENDING, started_time=None):
        self.lease_id = lease_id
        self.job_id = job_id
        self.session_name = session_name
        self.state = state
        self.started_time = started_time

    def acknowledge(self):
        """Record that the bot accepted the lease: PENDING to ACTIVE."""
        self._transition("acknowledge")

    def complete(self):
        """Record that the bot finished the lease: ACTIVE to COMPLETED."""
        self._transition("complete")

    def cancel(self):
        """Withdraw the lease from its bot: PENDING or ACTIVE to CANCELLED."""
        self._transition("cancel")

    def _transition(self, transition):
        sources, target = TRANSITIONS[transition]
        if self.state not in sources:
            self.log.error(
                "Rejected illegal transition {transition} of lease {lease_id} "
                "(job {job_id}, bot session {session_name}) from state {state}",
                transition=transition,
                lease_id=self.lease_id,
                job_id=self.job_id,
                session_name=self.session_name,
                state=state_name(self.state),
            )
            raise LeaseTransitionError(
                f"lease {self.lease_id}: illegal transition {transition} from state "
                f"{state_name(self.state)}"
            )
        self.state = target

    def to_proto(self, payload=None, requirements=()):
        """Return the lease as a ``bots_pb2.Lease`` message.

        ``payload`` is an ``Any`` for the bot to run and ``requirements`` the job's
        ``(name, value)`` platform requirements.
        """
        message = bots_pb2.Lease(id=self.lease_id, state=self.state)
        if payload is not None:
            message.payload.CopyFrom(payload)
        for name, value in requirements:
            message.requirements.properties.add(key=name, value=value)
        return message
