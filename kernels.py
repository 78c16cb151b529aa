"""GPU fast paths (being written): enable(module) swaps them in place."""


def enable(module):
    return module
