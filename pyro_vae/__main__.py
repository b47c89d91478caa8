"""``python -m pyro_vae ...`` is ``pyro-vae ...``; so is ``torchrun --nproc-per-node N -m pyro_vae ...``."""

import sys

from .cli import main

sys.exit(main())
