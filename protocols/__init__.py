"""cryoptycho.protocols — wire contracts, encoders/decoders, SDK clients and simulators.

Knows nothing of the engine. Our own protocol is documented in ``PROTOCOL.md``.
"""
