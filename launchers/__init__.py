"""Thin command-line entry points: `python -m launchers.<name>`; they parse arguments and call mmrec/cluster."""
