"""Our own helpers around the upstream ``moshi`` package.

They are deployed next to the Moshi venv by the ``moshi_server`` role and used on the controller by
the tests and the demo. Nothing here edits or copies upstream code, except :mod:`q8_patch`, which
rewrites one line of the installed loader (see its docstring).
"""
