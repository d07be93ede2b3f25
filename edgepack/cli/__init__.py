"""The ``edgepack`` command line."""
