"""A twistd application file for bgrid: run it with ``twistd -ny bgrid.tac``.

It builds the same service tree as ``twistd bgrid``; edit ARGUMENTS to configure it with
the options ``twistd bgrid --help`` lists.
"""

from twisted.application import service

from bgrid.tap import Options, makeService

ARGUMENTS = ["--listen", "127.0.0.1:50051", "--data-dir", "bgrid-data", "--local-bots", "2"]

options = Options()
options.parseOptions(ARGUMENTS)
application = service.Application("bgrid")
makeService(options).setServiceParent(application)
