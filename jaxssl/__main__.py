"""`python -m jaxssl train ...`: the same as the `jaxssl` command."""

import sys

from jaxssl.cli import main

sys.exit(main())
