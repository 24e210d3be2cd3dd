"""``python -m devserver`` runs the device-process command line."""

import sys

from devserver.cli import main

sys.exit(main())
