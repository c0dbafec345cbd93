import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Real public data for tests (../shared/data): tests that need it skip when it is absent.
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
