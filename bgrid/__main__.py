"""Run the ``bgrid`` command line as ``python -m bgrid``."""

from bgrid.cli.main import main

raise SystemExit(main())
