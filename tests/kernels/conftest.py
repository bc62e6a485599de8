"""Make ``ce_oracle`` (the shared naive reference) importable by the kernel tests and their workers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
