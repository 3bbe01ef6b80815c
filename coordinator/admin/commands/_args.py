"""Argument shapes several node commands share."""
from protocol import ids
from protocol.schema import Str

from ..command import Arg

NODE = Arg("node", "node id", Str(63, ids.NODE_ID, 1, "node id"), positional=True, required=True,
           metavar="NODE")
