from twisted.application.service import ServiceMaker

bgrid = ServiceMaker("bgrid", "bgrid.tap", "Remote execution service for Bazel and other REAPI clients.", "bgrid")
