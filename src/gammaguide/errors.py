"""The one public exception type of gammaguide."""


class GammaGuideError(Exception):
    """Raised for any input gammaguide cannot work with.

    The message always says what was wrong and what to try instead.
    """
