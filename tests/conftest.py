import os
import sys

# Let tests import the helpers in this folder (``from distributed import run_ranks``).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
