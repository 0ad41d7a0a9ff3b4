"""Helpers for the tests (not tests): private servers, process harnesses, shared checks.

Fixtures stay in the ``conftest.py`` files and import from here.
"""
