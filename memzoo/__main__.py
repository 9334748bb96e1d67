"""`python -m memzoo ...` is the same as the `memzoo` command."""

from memzoo.cli import main

raise SystemExit(main())
