"""Training and ablation harness (the paper's experiment). Not imported by the core library."""
