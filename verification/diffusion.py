"""Paper artefact 'diffusion' beside our measurements: `python verification/diffusion.py --preset smoke` (see README.md).

All logic lives in :func:`hcdiag.artefacts.diffusion`; this script is only its command line.
"""

import sys

from hcdiag.artefacts import script_main

if __name__ == "__main__":
    sys.exit(script_main("diffusion", sys.argv[1:]))
