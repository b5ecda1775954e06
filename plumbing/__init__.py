"""General plumbing under every other package: atomic outputs, input errors and exit codes, console output.

The lowest floor: it imports no other package of the program.
"""
