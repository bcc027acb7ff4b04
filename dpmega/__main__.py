"""``python -m dpmega ...`` runs the command line."""

import sys

from dpmega.cli import main

sys.exit(main())
