"""studio-runner: runs StudioML experiments from message queues on GPU and CPU machines."""

__version__ = "0.1.0"
