"""``python -m gradcent``: the same as the ``gradcent`` command."""

import sys

from gradcent.cli import main

sys.exit(main())
