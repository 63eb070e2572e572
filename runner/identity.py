"""Who this runner is, for the brokers that record which runner holds a message (claim areas, held queues)."""

from __future__ import annotations

import os
import re
import socket
import uuid


def new_runner_id() -> str:
    """Unique per runner process and readable where operators look (a directory, the RabbitMQ management UI): the
    host name (letters, digits, ``-`` and ``_`` only), the process id and a random part. It never holds a dot."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:60] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
