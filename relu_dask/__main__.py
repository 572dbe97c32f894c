"""``python -m relu_dask`` runs the command line."""

from __future__ import annotations

import sys

from relu_dask.cli import entry_point

if __name__ == "__main__":
    sys.exit(entry_point())
