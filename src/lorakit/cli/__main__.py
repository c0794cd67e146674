"""``python -m lorakit.cli``: the ``lorakit`` command (as under ``torchrun ... -m lorakit.cli finetune ...``)."""

import sys

from . import main

sys.exit(main())
