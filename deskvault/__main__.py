"""`python -m deskvault`: the same as the `deskvault` command."""

import sys

from deskvault.cli import main

sys.exit(main())
