"""The one exception refbuild's library code raises for a user-fixable problem."""
from data_manifests import MsrfaceError


class RefbuildError(MsrfaceError):
    """A problem the user can fix; the message says what is wrong and what to do.

    Only the CLI turns it into a one-line error and a non-zero exit.
    """
