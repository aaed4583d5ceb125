"""Fault-injection tests: a real daemon and real bots killed, stopped and starved on purpose."""
