"""The proxy between LAN clients and the broker.

Vocabulary:
- A *client leg* is the TCP connection from a LAN client to the appliance; the *broker leg* is the
  connection the appliance opens to the broker on the client's behalf. Every client has one of each.
- A `Session` (session.py) is one client's protocol logic, with no I/O: each input (bytes from
  either leg, the broker leg opened, a commit of the message log, a timeout) returns *commands*
  (commands.py): send bytes to the client or the broker, open or close a leg, pause reading the
  client, record an audit event, count a metric. It parses the client→broker stream packet by
  packet, asks the `Pipeline` for a verdict on every PUBLISH and will, and keeps MQTT's
  acknowledgement order and the message log's durability when it answers (`AckOrder`, acks.py).
  Broker→client traffic is relayed frame by frame.
- The session's policies are small units it composes, each without I/O: connect.py
  (authentication, the will, broker credentials and client-id namespacing), subscriptions.py (ACL
  read side, subscription quota, SUBACK merging), limits.py (in flight, message rate), aliases.py
  (topic aliases), qos2.py (QoS 2 flows the proxy finishes), replies.py (what the proxy says
  itself), framing.py (partial packets).
- `ProxyServer` (server.py) owns the proxy's sockets: asyncio Protocols, flow control between the
  two legs, and `ClientLeg.execute`, the one place the session's commands are carried out.
- On a `transport: websockets` listener, `WebSocketLeg` (websocket.py) wraps the client leg: the
  WebSocket handshake and framing outside, the same MQTT byte stream inside.
"""

from appliance.proxy.server import ProxyServer
from appliance.proxy.session import Session, SessionLimits

__all__ = ["ProxyServer", "Session", "SessionLimits"]
