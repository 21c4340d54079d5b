"""``python -m flora.train`` = ``flora-train``."""

import sys

from flora.train.cli import main

sys.exit(main())
