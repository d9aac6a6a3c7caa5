import sys

from modelmesh.cli import main

sys.exit(main())
