"""Paper artefact 'table1' beside our measurements: `python verification/table1.py --preset smoke` (see README.md).

All logic lives in :func:`hcdiag.artefacts.table1`; this script is only its command line.
"""

import sys

from hcdiag.artefacts import script_main

if __name__ == "__main__":
    sys.exit(script_main("table1", sys.argv[1:]))
