"""Committed test fixtures and the script that makes them (README.md)."""
