"""Make ``harness`` importable by the distributed tests (spawned workers import test modules)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
