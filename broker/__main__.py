"""``python -m broker`` is ``credbroker``."""

from broker.cli.main import main

raise SystemExit(main())
