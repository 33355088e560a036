"""Helpers for measuring livediff from the outside: numbered frames and client peers."""
