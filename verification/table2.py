"""Paper artefact 'table2' beside our measurements: `python verification/table2.py --preset smoke` (see README.md).

All logic lives in :func:`hcdiag.artefacts.table2`; this script is only its command line.
"""

import sys

from hcdiag.artefacts import script_main

if __name__ == "__main__":
    sys.exit(script_main("table2", sys.argv[1:]))
