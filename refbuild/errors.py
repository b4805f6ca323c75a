"""The one exception library code raises for a user-fixable problem."""


class RefbuildError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do.

    Only the CLI turns it into a one-line error and a non-zero exit.
    """
