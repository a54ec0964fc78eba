"""``python -m lsr_fast.train [--config F] [key=value ...]``, also under torchrun:
``torchrun --nproc_per_node=N -m lsr_fast.train --config configs/gta5_to_cityscapes.yaml``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
