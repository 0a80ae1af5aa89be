"""The worker agent: hardware detection, the agent's loops, service runtimes.

Nothing heavy is imported here: ``rma --help`` imports the CLI, which imports this package only
inside the ``rma worker`` commands.
"""
