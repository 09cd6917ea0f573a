"""Paper artefact 'figure4' beside our measurements: `python verification/figure4.py --preset smoke` (see README.md).

All logic lives in :func:`hcdiag.artefacts.figure4`; this script is only its command line.
"""

import sys

from hcdiag.artefacts import script_main

if __name__ == "__main__":
    sys.exit(script_main("figure4", sys.argv[1:]))
