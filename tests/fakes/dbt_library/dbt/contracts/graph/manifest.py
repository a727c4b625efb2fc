class Manifest:
    """What the stand-in's `parse` returns: the driver keeps it for the commands after it."""
