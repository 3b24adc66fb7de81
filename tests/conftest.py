"""Test-session set-up shared by every test file."""

import os

# numba fixes its thread count when its pool starts and refuses, at every later compilation, a
# NUMBA_NUM_THREADS environment value that differs from it; some tests start one-thread workers.
# Start the pool here and pin the variable to the count it started with, for the whole session.
from diffcp.search import grid as _grid

if _grid.AVAILABLE:
    import numba

    _grid._launch_threads()
    os.environ["NUMBA_NUM_THREADS"] = str(numba.config.NUMBA_NUM_THREADS)
