"""PEFT's own generic tuner tests, run against InfoSteer (see peft_generic.py); this directory's modules import each
other by name."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
