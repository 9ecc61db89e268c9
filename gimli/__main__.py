"""``python -m gimli``: the command line (see ``gimli/_cli.py``)."""

import sys

from ._cli import main

sys.exit(main())
