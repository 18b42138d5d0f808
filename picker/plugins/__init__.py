"""Scheduling plugins: filters, scorers and pickers, pure functions of a snapshot."""
