"""``python -m vmm.bench``: see :mod:`vmm.bench`."""
import sys

from vmm.bench import main

sys.exit(main())
