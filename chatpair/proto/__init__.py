"""The chatpair wire protocol, version 1, sans-IO: bytes in, events out.

Nothing in this package touches a socket or a clock, so every rule can be
tested exactly and shared by the server, the client and the benchmark. It
imports nothing of chatpair but :mod:`chatpair.errors`. ``docs/protocol.md``
is the same contract in prose.

=================  ==========================================================
module             what lives there
=================  ==========================================================
``wire``           frame types, error codes, limits, the one header check
``frames``         Frame/EndOfStream events, encoders, the frame decoder,
                   what a client may send after HELLO
``handshake``      banner, name and room rules, HELLO and the first line
``lines``          line mode: the line decoder, typed commands
``sanitize``       section 5: what may reach a terminal
=================  ==========================================================

The names most code needs are re-exported here, so ``from chatpair.proto
import FrameType, FrameDecoder`` works; each still has one home.
"""

from chatpair.proto.frames import (
    EndOfStream,
    Frame,
    FrameDecoder,
    check_client_frame,
    decode_json,
    encode_error,
    encode_frame,
    encode_json_frame,
    encode_msg,
    encode_notice,
    split_utf8,
)
from chatpair.proto.handshake import (
    NAME_RULE,
    ROOM_RULE,
    Hello,
    check_banner,
    encode_hello,
    make_banner,
    parse_hello,
    parse_name_line,
    validate_name,
    validate_room,
)
from chatpair.proto.lines import LINE_COMMANDS, LineCommand, LineDecoder, LineKind, parse_client_line
from chatpair.proto.sanitize import sanitize, sanitize_name
from chatpair.proto.wire import (
    BANNER_PREFIX,
    CLIENT_TYPES,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_FRAME,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PORT,
    HANDSHAKE_MAX,
    HEADER,
    HEADER_SIZE,
    MAX_BANNER,
    MAX_FRAME_CEILING,
    MAX_NAME,
    MAX_PING_PAYLOAD,
    MAX_ROOM,
    NEED_DATA,
    PEER_LEFT_REASONS,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameType,
    ProtocolError,
    check_header,
    check_length,
)

__all__ = [
    "BANNER_PREFIX", "CLIENT_TYPES", "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_FRAME",
    "DEFAULT_PING_INTERVAL", "DEFAULT_PORT", "HANDSHAKE_MAX", "HEADER", "HEADER_SIZE", "LINE_COMMANDS",
    "MAX_BANNER", "MAX_FRAME_CEILING", "MAX_NAME", "MAX_PING_PAYLOAD", "MAX_ROOM", "NAME_RULE", "NEED_DATA",
    "PEER_LEFT_REASONS", "PROTOCOL_VERSION", "ROOM_RULE", "EndOfStream", "ErrorCode", "Frame", "FrameDecoder",
    "FrameType", "Hello", "LineCommand", "LineDecoder", "LineKind", "ProtocolError", "check_banner",
    "check_client_frame", "check_header", "check_length", "decode_json", "encode_error", "encode_frame",
    "encode_hello", "encode_json_frame", "encode_msg", "encode_notice", "make_banner", "parse_client_line",
    "parse_hello", "parse_name_line", "sanitize", "sanitize_name", "split_utf8", "validate_name",
    "validate_room",
]
