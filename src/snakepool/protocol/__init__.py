"""The snakepool wire protocol, sans-IO (no asyncio, no anyio, no sockets).

Every frame is a 4-byte big-endian length then one MessagePack map; see
``docs/protocol.md`` for the messages and the handshake. This package is the
only codec: a host and a worker exchange frames through a :class:`Connection`
(``receive_data`` -> messages, ``send`` -> bytes), and a fork server and its
host through a :class:`TemplateConnection`.
"""

from ._connection import Connection as Connection
from ._connection import ReceiveError as ReceiveError
from ._connection import Role as Role
from ._framing import CLOSED as CLOSED
from ._framing import DECODE_FLOOR_BYTES as DECODE_FLOOR_BYTES
from ._framing import DEFAULT_MAX_FRAME_BYTES as DEFAULT_MAX_FRAME_BYTES
from ._framing import HEADER_BYTES as HEADER_BYTES
from ._framing import MAX_NESTING as MAX_NESTING
from ._framing import NEED_DATA as NEED_DATA
from ._framing import FrameDecoder as FrameDecoder
from ._framing import FrameEncoder as FrameEncoder
from ._framing import Sentinel as Sentinel
from ._messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._messages import RESERVED_TOOL_PREFIX as RESERVED_TOOL_PREFIX
from ._messages import SAVE_STATE_TOOL as SAVE_STATE_TOOL
from ._messages import STREAM_WINDOW as STREAM_WINDOW
from ._messages import Call as Call
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
from ._messages import from_wire as from_wire
from ._messages import message as message
from ._messages import to_wire as to_wire
from ._messages import wire as wire
from ._template import Exited as Exited
from ._template import ImportFailed as ImportFailed
from ._template import Importing as Importing
from ._template import Ready as Ready
from ._template import Spawn as Spawn
from ._template import Spawned as Spawned
from ._template import SpawnFailed as SpawnFailed
from ._template import TemplateConnection as TemplateConnection
from ._template import TemplateInit as TemplateInit
from ._template import Unsafe as Unsafe

__all__ = [
    "CLOSED",
    "DECODE_FLOOR_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "MAX_NESTING",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "RESERVED_TOOL_PREFIX",
    "SAVE_STATE_TOOL",
    "STREAM_WINDOW",
    "Call",
    "CallMode",
    "Cancel",
    "Connection",
    "Credit",
    "End",
    "Exited",
    "Failure",
    "FailureKind",
    "FrameDecoder",
    "FrameEncoder",
    "Goodbye",
    "Hello",
    "HostCall",
    "HostFailure",
    "HostReply",
    "ImportFailed",
    "Importing",
    "Init",
    "Item",
    "Log",
    "Message",
    "Ping",
    "Pong",
    "Ready",
    "ReceiveError",
    "Result",
    "Role",
    "Sentinel",
    "SessionDrop",
    "SessionSync",
    "Spawn",
    "SpawnFailed",
    "Spawned",
    "StartupFailed",
    "TemplateConnection",
    "TemplateInit",
    "Unsafe",
    "Withdraw",
    "from_wire",
    "message",
    "to_wire",
    "wire",
]
