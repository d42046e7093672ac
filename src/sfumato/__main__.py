"""``python -m sfumato …`` (and ``torchrun -m sfumato train shapes …``): the ``sfumato`` command."""

import sys

from .commands import main

sys.exit(main())
