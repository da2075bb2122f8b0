"""The virtual microscope: specimens from atomic models, ptychography and cryo-EM simulation."""
