"""``python -m training.experiments.ablation``."""
from .cli import main

main()
