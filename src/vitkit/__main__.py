"""`python -m vitkit ...` runs the `vitkit` command: for an environment whose scripts directory is not on PATH."""

import sys

from vitkit.cli import main

sys.exit(main())
