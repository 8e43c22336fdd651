"""``typing``'s run-time pieces for the modules a child process imports, without ``typing``.

procsafe's riders (`_spawnhook`) import a few of its modules in every spawn and
forkserver child: the module map, the stack-dump handler, the environment, the
registrations. Importing ``typing`` there costs a child about 3 ms that nothing else of
procsafe needs; those modules take their annotations' names under ``TYPE_CHECKING`` and
`final` from here. Imports nothing else.
"""

from __future__ import annotations

import contextlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import final as final
else:

    def final(cls: object) -> object:
        """``typing.final`` at run time: a mark for type checkers, nothing more."""
        with contextlib.suppress(AttributeError, TypeError):
            cls.__final__ = True  # type: ignore[attr-defined]
        return cls
