"""``python -m aule_kp info | demo | bench``."""

import sys

from .cli import main

sys.exit(main())
