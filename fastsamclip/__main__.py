import sys

from fastsamclip.cli import main

sys.exit(main())
