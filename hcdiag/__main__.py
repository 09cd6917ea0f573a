import sys

from hcdiag.cli import main

sys.exit(main())
