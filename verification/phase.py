"""Paper artefact 'phase' beside our measurements: `python verification/phase.py --preset smoke` (see README.md).

All logic lives in :func:`hcdiag.artefacts.phase`; this script is only its command line.
"""

import sys

from hcdiag.artefacts import script_main

if __name__ == "__main__":
    sys.exit(script_main("phase", sys.argv[1:]))
