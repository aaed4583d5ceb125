"""The ``bgrid`` command line: the bot, and REAPI client commands for use without Bazel."""
