"""User-facing errors: bad configs, files and inputs end with a clear message, not a traceback."""


class UserError(ValueError):
  """An input problem the user can fix; the message names the file, field or value."""
