"""What every stage script shares: logging, the validated params, clean error exits."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from .config import Params, load_params
from .errors import Interrupted, SpamloraError
from .fileio import no_space_message
from .process import stop_signals

PARAMS_FILE = "params.yaml"
INTERRUPTED_STATUS = 130  # as a shell reports a command stopped by Ctrl-C


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(main: Callable[[Params], None], params_file: str = PARAMS_FILE) -> None:
    """Validate `params_file` before any work, then run `main(params)`; a
    `SpamloraError` ends the stage with its message and exit status 1. SIGTERM (and
    SIGHUP, SIGBREAK: `stop_signals`) stops it as Ctrl-C does (an exception, so its
    MLflow run is ended as KILLED and no output is left half-written), with status 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # A tracking server that does not answer is said once, in a line of ours
    # (tracking.StepLog), not in a warning per retried request.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    for signum in stop_signals():  # SIGINT too where a background shell ignored it
        signal.signal(signum, _interrupt)
    try:
        main(load_params(params_file))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)
    except SpamloraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS if isinstance(e, Interrupted) else 1)
    except Exception as e:
        if (message := no_space_message(e)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
