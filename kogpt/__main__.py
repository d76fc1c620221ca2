"""`python -m kogpt`: the interactive prompt (or any subcommand, as `kogpt`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
