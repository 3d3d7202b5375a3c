"""``python -m jaxserve.profiling``: see ``jaxserve.profiling.cli``."""

import sys

from jaxserve.profiling.cli import main

sys.exit(main())
