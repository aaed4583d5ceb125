"""Tests of the bgrid bot."""
