"""CLI commands (filled in by its module owner)."""

COMMANDS: list = []
