"""``python -m ehlo``: the same command line as the ``ehlo`` script."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
