"""``python -m training`` is ``python -m training.run``."""
from .run import main

main()
