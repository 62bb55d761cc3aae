import sys

from vrwkv.cli import main

sys.exit(main())
