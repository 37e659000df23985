"""``python -m wpeft`` runs the ``wpeft`` command."""

import sys

from wpeft.cli import main

sys.exit(main())
