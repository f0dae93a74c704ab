"""``python -m broker`` is ``credbroker``."""

from broker.cli import main

raise SystemExit(main())
