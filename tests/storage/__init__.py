"""Tests of bgrid's storage against real LMDB environments in temporary directories."""
