"""The ``fedctl`` command line: parses, calls the Python API, prints. No heavy imports here."""
