"""End-to-end tests that drive Bazel against a real bgrid daemon and bots."""
