"""The experiment harness: tasks, one training loop, the ablation grid and its reports (docs/harness.md).

The core library does not import it; only the command line (``gammaguide/cli.py``) registers its subcommands."""
