"""``python -m adapterswap``: the same as the ``adapterswap`` command (and what ``ray job submit`` runs)."""

import sys

from adapterswap.cli.main import main

sys.exit(main())
