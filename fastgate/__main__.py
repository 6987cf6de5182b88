"""`python -m fastgate` is the `fastgate` command."""

import sys

from fastgate.cli import main

sys.exit(main())
