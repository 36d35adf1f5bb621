"""The snakepool wire protocol, sans-IO (no asyncio, no anyio, no sockets).

Every frame is a 4-byte big-endian length then one MessagePack map; see
``docs/protocol.md`` for the messages and the handshake.
"""

from ._connection import Connection as Connection
from ._connection import Role as Role
from ._framing import CLOSED as CLOSED
from ._framing import DECODE_FLOOR_BYTES as DECODE_FLOOR_BYTES
from ._framing import DEFAULT_MAX_FRAME_BYTES as DEFAULT_MAX_FRAME_BYTES
from ._framing import HEADER_BYTES as HEADER_BYTES
from ._framing import NEED_DATA as NEED_DATA
from ._framing import FrameDecoder as FrameDecoder
from ._framing import FrameEncoder as FrameEncoder
from ._framing import Sentinel as Sentinel
from ._messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._messages import STREAM_WINDOW as STREAM_WINDOW
from ._messages import Call as Call
from ._messages import CallFields as CallFields
from ._messages import CallMode as CallMode
from ._messages import Cancel as Cancel
from ._messages import Credit as Credit
from ._messages import End as End
from ._messages import Failure as Failure
from ._messages import FailureKind as FailureKind
from ._messages import Goodbye as Goodbye
from ._messages import Hello as Hello
from ._messages import HostCall as HostCall
from ._messages import HostFailure as HostFailure
from ._messages import HostReply as HostReply
from ._messages import Init as Init
from ._messages import Item as Item
from ._messages import Log as Log
from ._messages import Message as Message
from ._messages import Ping as Ping
from ._messages import Pong as Pong
from ._messages import Result as Result
from ._messages import SessionDrop as SessionDrop
from ._messages import SessionSync as SessionSync
from ._messages import StartupFailed as StartupFailed
from ._messages import Withdraw as Withdraw
from ._messages import call_fields as call_fields
from ._messages import call_to_wire as call_to_wire
from ._messages import from_wire as from_wire
from ._messages import to_wire as to_wire

__all__ = [
    "CLOSED",
    "DECODE_FLOOR_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "STREAM_WINDOW",
    "Call",
    "CallFields",
    "CallMode",
    "Cancel",
    "Connection",
    "Credit",
    "End",
    "Failure",
    "FailureKind",
    "FrameDecoder",
    "FrameEncoder",
    "Goodbye",
    "Hello",
    "HostCall",
    "HostFailure",
    "HostReply",
    "Init",
    "Item",
    "Log",
    "Message",
    "Ping",
    "Pong",
    "Result",
    "Role",
    "Sentinel",
    "SessionDrop",
    "SessionSync",
    "StartupFailed",
    "Withdraw",
    "call_fields",
    "call_to_wire",
    "from_wire",
    "to_wire",
]
