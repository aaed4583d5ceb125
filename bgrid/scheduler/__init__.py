"""The scheduler of bgrid: jobs, operations, bot sessions and leases, on the reactor thread.

``Scheduler`` is the facade that the Execution, Operations and Bots servicers call.
"""

from bgrid.scheduler.lease import LeaseTransitionError
from bgrid.scheduler.scheduler import Scheduler, StoredResult
from bgrid.scheduler.watch import OperationWatch

__all__ = ["LeaseTransitionError", "OperationWatch", "Scheduler", "StoredResult"]
