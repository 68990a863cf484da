"""What every command-line entry point shares (cli/errors.py: one-line user errors). Imports nothing in-house."""
