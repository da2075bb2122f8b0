"""cryoptycho.gpu — the numerical engine and the virtual microscope.

Every function here is written once against the array module of its inputs (NumPy or CuPy,
see :mod:`cryoptycho.gpu.backend`). Nothing here knows about sockets or file formats.
Conventions (units, FFT normalisation, frame centring, positions) are in ``CONVENTIONS.md``.
"""
