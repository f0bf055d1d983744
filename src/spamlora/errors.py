"""The base of every error the product reports to users as a message, not a traceback."""


class SpamloraError(Exception):
    pass


class Interrupted(SpamloraError):
    """Work stopped on request (SIGINT, SIGTERM) after saving what can be resumed."""
