"""Tests of bgrid.client."""
