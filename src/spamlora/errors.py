"""The base of every error the product reports to users as a message, not a traceback."""


class SpamloraError(Exception):
    pass
