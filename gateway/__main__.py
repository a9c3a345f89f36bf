"""``python -m gateway``: the same as the ``ctwa-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())
