"""Paper artefact 'figure5' beside our measurements: `python verification/figure5.py --preset smoke` (see README.md).

All logic lives in :func:`hcdiag.artefacts.figure5`; this script is only its command line.
"""

import sys

from hcdiag.artefacts import script_main

if __name__ == "__main__":
    sys.exit(script_main("figure5", sys.argv[1:]))
