"""The Remote Workers API Bots service: bot sessions and the leases they carry."""

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2_grpc
from bgrid.bridge import as_future
from bgrid.servicers.base import unary_handler

# Seconds kept free at the end of a bot's UpdateBotSession deadline, so the long poll
# answers before the bot's call times out.
DEADLINE_MARGIN = 1.0


class BotsServicer(bots_pb2_grpc.BotsServicer):
    """Serves CreateBotSession and UpdateBotSession through the scheduler."""

    def __init__(self, instance_names, scheduler, clock):
        self.instance_names = instance_names
        self.scheduler = scheduler
        self.clock = clock

    @unary_handler
    async def CreateBotSession(self, request, context):
        parent = self.instance_names.check(request.parent, field="parent")
        bot_session = self.scheduler.create_bot_session(parent, request.bot_session)
        # The session may carry a lease, which must be on disk before the bot sees it.
        await as_future(self.scheduler.durable())
        return bot_session

    @unary_handler
    async def UpdateBotSession(self, request, context):
        deadline = None
        time_remaining = context.time_remaining()
        if time_remaining is not None:
            deadline = self.clock.seconds() + max(0.0, time_remaining - DEADLINE_MARGIN)
        return await as_future(
            self.scheduler.update_bot_session(request.name, request.bot_session, deadline=deadline)
        )
