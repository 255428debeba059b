"""`python -m p11grid` is the `p11grid` command."""

import sys

from p11grid.cli import main

sys.exit(main())
