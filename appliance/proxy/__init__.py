"""The proxy between LAN clients and the broker.

Vocabulary:
- A *client leg* is the TCP connection from a LAN client to the appliance; the *broker leg* is the
  connection the appliance opens to the broker on the client's behalf. Every client has one of each.
- A `Session` (session.py) is one client's protocol logic, with no I/O: bytes in from either leg,
  bytes out to either leg, plus flags that ask the server to open or close a leg. It parses the
  client→broker stream packet by packet, asks the `Pipeline` for a verdict on every PUBLISH and
  will, and keeps MQTT's acknowledgement order when it answers a rejected message itself
  (`AckOrder`, acks.py). Broker→client traffic is relayed frame by frame.
- `ProxyServer` (server.py) is the only code that touches sockets: asyncio Protocols, flow
  control between the two legs, one write per received batch.
- On a `transport: websockets` listener, `WebSocketLeg` (websocket.py) wraps the client leg: the
  WebSocket handshake and framing outside, the same MQTT byte stream inside.
"""

from appliance.proxy.server import ProxyServer
from appliance.proxy.session import Session, SessionLimits

__all__ = ["ProxyServer", "Session", "SessionLimits"]
