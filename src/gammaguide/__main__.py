"""``python -m gammaguide`` (also what ``torchrun -m gammaguide`` runs)."""

from .cli import main

raise SystemExit(main())
