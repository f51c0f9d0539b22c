import sys
from pathlib import Path

# The tests import chartlib from this directory whatever the working directory is.
sys.path.insert(0, str(Path(__file__).resolve().parent))
