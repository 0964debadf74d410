"""Text data: offline corpus building (``corpus``) and document streaming."""
