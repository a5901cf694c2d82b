"""The errors adaptok raises besides :class:`adaptok.BackendError`."""


class UnsupportedModelError(ValueError):
    """A model, or a use of it, that adaptok cannot run exactly."""
