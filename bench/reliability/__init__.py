"""Reliability checks that take long: each a repeatable script ending in one PASS/FAIL line (`make soak`)."""
