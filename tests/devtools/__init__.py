"""Development tools, not part of either service: the tiny models built from real configs, a
teacher service in a child process, the two CPU demos, and the deploy layout check. They run
from a checkout (``python -m tests.devtools.X``); the services never import them."""
