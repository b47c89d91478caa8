"""The one exception type a user of pyro_vae sees for bad input."""


class InputError(ValueError):
    """Bad input from the user: a message that names the problem and the fix.

    The command line prints these without a traceback and exits with status 2.
    """
