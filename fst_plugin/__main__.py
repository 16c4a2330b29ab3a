"""``python -m fst_plugin ...`` (and ``torchrun --nproc_per_node N -m fst_plugin run fst ...``): the fst-plugin
command."""
import sys

from fst_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main())
