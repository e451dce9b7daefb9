"""A sans-IO codec for MQTT 3.1, 3.1.1 and 5.0: bytes in, packets out, and back.

Vocabulary
----------
frame
    One packet's bytes as cut from the stream by ``FrameReader``: the first
    byte of the fixed header (packet type and flags), the exact wire bytes
    (``raw``) and where the body starts. Forwarding ``frame.raw`` unchanged is
    the cheapest way to relay a packet you do not need to modify.
packet
    A frozen dataclass per MQTT control packet (``Publish``, ``Suback``...).
    Constructors validate and raise ``LocalProtocolError`` on misuse.
version
    ``ProtocolVersion``: decoding and encoding depend on it (properties and
    reason codes exist only in MQTT 5). CONNECT carries its own version;
    ``Decoder`` learns it from there.
properties
    ``Properties``: MQTT 5 properties as an immutable, ordered tuple of
    ``(PropertyId, value)`` pairs; ``Properties.EMPTY`` elsewhere.
reason code
    ``ReasonCode`` (MQTT 5) or ``ConnectReturnCode`` (3.1.1 CONNACK); carried
    as plain ints on packets. ``RemoteProtocolError.reason_code`` tells what
    to answer a peer that broke the protocol.
``NEED_DATA``
    Returned when the buffered bytes do not yet hold a whole packet. Partial
    input is normal, never an error.

Pull API::

    decoder = Decoder()                  # server side: learns version from CONNECT
    decoder.receive_data(chunk)
    while (packet := decoder.next_packet()) is not NEED_DATA:
        ...
    sock.send(encode_packet(Connack(), decoder.version))

Hot path for relays: ``FrameReader`` + ``decode_publish`` (or ``publish_fields``, without the
``Publish`` object) + ``encode_publish``.

Clients (the forwarder's uplink, the admin operations, the benchmark's sensors) drive one sans-IO
client core, ``appliance.mqtt.client.Client``: ``connect()``/``publish()``... return the bytes to
send, ``receive_data()`` + ``next_event()`` turn the server's bytes into events (``Connected``,
``Published``, ``Disconnected``...), and keepalive is judged from a clock value the caller passes.

Nothing in this package does I/O or knows about asyncio.
"""

from .connection import Decoder
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import NEED_DATA, Frame, FrameReader, read_fixed_header
from .packets import (
    Auth, Connack, Connect, Disconnect, Packet, PacketType, Pingreq, Pingresp, ProtocolVersion,
    Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback,
    Unsubscribe, Will,
)
from .properties import Properties, PropertyId
from .reader import PublishFields, decode_packet, decode_publish, publish_fields
from .reason_codes import ConnectReturnCode, ReasonCode
from .writer import encode_packet, encode_publish

__all__ = [
    "NEED_DATA", "ProtocolVersion", "PacketType", "ReasonCode", "ConnectReturnCode", "PropertyId",
    "Properties", "Packet", "Connect", "Will", "Connack", "Publish", "Puback", "Pubrec", "Pubrel",
    "Pubcomp", "Subscribe", "Subscription", "Suback", "Unsubscribe", "Unsuback", "Pingreq",
    "Pingresp", "Disconnect", "Auth", "Frame", "FrameReader", "read_fixed_header", "Decoder", "decode_packet",
    "decode_publish", "publish_fields", "PublishFields", "encode_packet", "encode_publish", "ProtocolError", "RemoteProtocolError",
    "LocalProtocolError",
]
