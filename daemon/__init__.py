"""cryoptycho.daemon — the live reconstruction service, its CLI and its storage."""
