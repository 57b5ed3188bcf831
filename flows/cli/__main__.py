"""Entry point: ``python -m flows.cli`` (how the background WAL pusher and prefetcher are started)."""

from __future__ import annotations

import sys

from flows.cli.entry import main

sys.exit(main())
