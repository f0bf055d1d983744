"""What every stage script shares: logging, the validated params, clean error exits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .config import Params, load_params
from .errors import SpamloraError

PARAMS_FILE = "params.yaml"


def run(main: Callable[[Params], None], params_file: str = PARAMS_FILE) -> None:
    """Validate `params_file` before any work, then run `main(params)`; a
    `SpamloraError` ends the stage with its message and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(load_params(params_file))
    except SpamloraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
