"""One exception family for everything a user can get wrong; the CLI prints it as one line."""


class ConsaError(Exception):
    """Bad input or configuration: reported as ``consa: error: <message>`` with exit code 2."""
