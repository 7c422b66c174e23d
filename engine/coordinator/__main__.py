"""``python -m engine.coordinator``: the same as ``everyprompt-train``."""
from engine.coordinator.cli import main

raise SystemExit(main())
