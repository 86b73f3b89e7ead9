"""The error a `sealmesh` command reports as one line and exit status 2, with no traceback.

Its own module, below node/cli.py: the modules that node/cli.py loads for a command
(node/membership_cli.py, node/roles/challenger.py's endpoint file) raise it without
importing the CLI that imports them.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for or wrote is wrong; the message says what to change."""
