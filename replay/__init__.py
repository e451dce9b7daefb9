"""Replay recorded traffic against a schema set, and diff schema sets (`replay diff`)."""
