"""`python -m lopro ...` (and `torchrun --nproc-per-node N -m lopro quantize ...`): the command line."""
import sys

from lopro.cli import main

sys.exit(main())
