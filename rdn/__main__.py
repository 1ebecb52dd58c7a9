"""``python -m rdn ...`` runs the ``rdn`` command line (:mod:`rdn.cli`)."""

import sys

from rdn.cli import main

sys.exit(main())
