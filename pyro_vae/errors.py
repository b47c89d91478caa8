"""The one exception type a user of pyro_vae sees for bad input."""


class InputError(ValueError):
    """Bad input from the user: a message that names the problem and the fix.

    The command line prints these without a traceback and exits with status 2.

    ``rank_specific``: under ``torchrun``, True for an error that only this
    process met (its GPU, its files); every rank prints such an error, while one
    that every rank meets alike is printed once, by rank 0.
    """

    def __init__(self, *args, rank_specific=False):
        if args and isinstance(args[0], str) and "\nTrace Shapes:" in args[0].replace(" ", "").replace(
                "TraceShapes:", "Trace Shapes:"):
            # raised inside a traced model or guide: Pyro re-raises it with the trace's shapes appended, which
            # say nothing here; the message stays the one line that names the problem and the fix
            args = (args[0].split("\n", 1)[0], *args[1:])
        super().__init__(*args)
        self.rank_specific = rank_specific
