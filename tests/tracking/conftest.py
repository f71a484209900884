"""The tracking tests' helpers module (``reference_data.py``) sits beside this file; pytest
runs with ``--import-mode=importlib``, so its folder is put on ``sys.path`` here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
