import sys

from numba_kd.cli import main

if __name__ == "__main__":  # documentation tools import this module without running it
    sys.exit(main())
