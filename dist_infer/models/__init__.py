"""Model definitions, written like single-device code with the parallel layer classes."""
