"""`python -m spd_lens.cli ...`, as torchrun and accelerate launch call it."""

import sys

from spd_lens.cli import main

sys.exit(main())
