import sys

from numba_kd.cli import main

sys.exit(main())
