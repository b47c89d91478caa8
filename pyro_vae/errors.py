"""The one exception type a user of pyro_vae sees for bad input."""


class InputError(ValueError):
    """Bad input from the user: a message that names the problem and the fix.

    The command line prints these without a traceback and exits with status 2.

    ``rank_specific``: under ``torchrun``, True for an error that only this
    process met (its GPU, its files); every rank prints such an error, while one
    that every rank meets alike is printed once, by rank 0.
    """

    def __init__(self, *args, rank_specific=False):
        super().__init__(*args)
        self.rank_specific = rank_specific
