"""Reliability suite: faults, interruptions and bad inputs (see RELIABILITY.md)."""
