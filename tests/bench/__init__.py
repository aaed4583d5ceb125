"""Tests of the benchmark tool in bench/: a smoke run per server and its parsers."""
