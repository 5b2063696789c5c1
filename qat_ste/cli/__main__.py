"""``python -m qat_ste.cli``: the ``qat-ste`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
