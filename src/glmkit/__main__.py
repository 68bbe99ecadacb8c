"""`python -m glmkit ...` (and `torchrun -m glmkit ...`): the same as the `glmkit` command."""

import sys

from .cli import main

sys.exit(main())
