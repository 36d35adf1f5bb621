"""``python -m snakepool.cli``: the ``snakepool`` command."""

import sys

from ._main import main

sys.exit(main())
