"""`python -m torchrelay ...` is the `torchrelay` command."""

import sys

from torchrelay._cli import main

sys.exit(main())
