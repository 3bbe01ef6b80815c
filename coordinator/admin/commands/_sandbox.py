"""What the sandbox commands share: the id argument and the service lookup."""
from __future__ import annotations

from typing import Any

from protocol.errors import InvalidRequest
from protocol.schema import Str

from ..command import Arg

# The format (CONV-1) is checked by the coordinator, which answers InvalidRequest (CONV-2).
SANDBOX = Arg("sandbox", "sandbox id", Str(64, None, 1, "sandbox id"), positional=True, required=True,
              metavar="SBX")


def service(ctx: Any) -> Any:
    if getattr(ctx, "sandboxes", None) is None:
        raise InvalidRequest("sandboxes are not served by this coordinator", {"field": "command"})
    return ctx.sandboxes
