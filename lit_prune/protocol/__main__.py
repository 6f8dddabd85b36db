"""``python -m lit_prune.protocol``: the same command as ``python -m lit_prune.rethink``."""

import sys

from lit_prune.protocol.cli import main

sys.exit(main())
