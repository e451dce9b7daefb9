"""Record the bytes real MQTT peers put on the wire.

A relay thread sits between clients (paho-mqtt, mosquitto_pub) and a real
mosquitto broker and records both directions of every connection. The test
suite replays the recording stored in fixtures/packets/captured.json; run this
file to refresh it:

    python -m tests.mqtt.mqtt_capture
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "packets" / "captured.json"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WAIT = 10.0  # seconds to wait for any one event before declaring the peer stuck


@dataclass
class Recording:
    client_to_server: bytearray = field(default_factory=bytearray)
    server_to_client: bytearray = field(default_factory=bytearray)
    done: threading.Event = field(default_factory=threading.Event)


class Relay:
    """127.0.0.1:<port> -> upstream, one Recording per accepted connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recordings: list[Recording] = []
        self.accepted = threading.Condition()
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            recording = Recording()
            pumps = [
                threading.Thread(target=self._pump, args=(downstream, upstream, recording.client_to_server), daemon=True),
                threading.Thread(target=self._pump, args=(upstream, downstream, recording.server_to_client), daemon=True),
            ]
            for pump in pumps:
                pump.start()
            threading.Thread(target=self._finish, args=(pumps, recording, downstream, upstream), daemon=True).start()
            with self.accepted:
                self.recordings.append(recording)
                self.accepted.notify_all()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        try:
            while data := src.recv(65536):
                log += data
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _finish(pumps: list[threading.Thread], recording: Recording, *socks: socket.socket) -> None:
        for pump in pumps:
            pump.join()
        for sock in socks:
            sock.close()
        recording.done.set()

    def close(self) -> None:
        self.listener.close()


class Broker:
    """A throwaway mosquitto on a free local port."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        with socket.create_server(("127.0.0.1", 0)) as probe:
            self.port = probe.getsockname()[1]
        conf = Path(self.dir.name) / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type all\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # wait for the listener, not for a timer
            if "listen socket" in line:
                break
        else:
            raise RuntimeError("mosquitto did not start")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(WAIT)
        self.dir.cleanup()


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(WAIT):
        raise TimeoutError(f"timed out waiting for {what}")


def _paho_session(port: int, v5: bool) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties
    from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode
    from paho.mqtt.subscribeoptions import SubscribeOptions

    protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    tag = "v5" if v5 else "v311"
    events = {name: threading.Event() for name in (
        "sub_connected", "pub_connected", "subscribed", "unsubscribed", "pingresp", "all_messages")}
    received: list[object] = []

    def props(packet_type: int, **values: object) -> PahoProperties | None:
        if not v5:
            return None
        p = PahoProperties(packet_type)
        for name, value in values.items():
            setattr(p, name, value)
        return p

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"capture-sub-{tag}", protocol=protocol)
    sub.on_connect = lambda *a: events["sub_connected"].set()
    sub.on_subscribe = lambda *a: events["subscribed"].set()
    sub.on_unsubscribe = lambda *a: events["unsubscribed"].set()

    def on_message(client: object, userdata: object, message: object) -> None:
        received.append(message)
        if len(received) == 4:
            events["all_messages"].set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", port, keepalive=30, properties=props(
        PacketTypes.CONNECT, SessionExpiryInterval=60, ReceiveMaximum=20,
        UserProperty=[("role", "subscriber")]))
    sub.loop_start()
    _wait(events["sub_connected"], "subscriber CONNACK")
    if v5:
        topics = [("gov/#", SubscribeOptions(qos=2, retainAsPublished=True, retainHandling=1)),
                  ("gov/+/x", SubscribeOptions(qos=1, noLocal=True))]
        sub.subscribe(topics, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42))
    else:
        sub.subscribe([("gov/#", 2), ("gov/+/x", 1)])
    _wait(events["subscribed"], "SUBACK")

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"capture-pub-{tag}", protocol=protocol)
    pub.on_connect = lambda *a: events["pub_connected"].set()
    pub.on_log = lambda client, userdata, level, buf: (
        events["pingresp"].set() if "PINGRESP" in buf else None)
    pub.username_pw_set("alice", "s3cret")
    pub.will_set("gov/will", b"gone", qos=1, retain=True, properties=props(
        PacketTypes.WILLMESSAGE, WillDelayInterval=5, ContentType="text/plain"))
    pub.connect("127.0.0.1", port, keepalive=45, properties=props(
        PacketTypes.CONNECT, SessionExpiryInterval=0, TopicAliasMaximum=5, MaximumPacketSize=65536))
    pub.loop_start()
    _wait(events["pub_connected"], "publisher CONNACK")

    pub.publish("gov/a", b"qos0", qos=0).wait_for_publish(WAIT)
    pub.publish("gov/b", b"qos1", qos=1, properties=props(
        PacketTypes.PUBLISH, PayloadFormatIndicator=1, MessageExpiryInterval=300,
        ContentType="application/json", ResponseTopic="gov/reply", CorrelationData=b"\x01\x02",
        UserProperty=[("a", "1"), ("a", "2"), ("b", "3")])).wait_for_publish(WAIT)
    pub.publish("gov/c/x", b"qos2", qos=2, retain=False, properties=props(
        PacketTypes.PUBLISH, TopicAlias=1)).wait_for_publish(WAIT)
    if v5:  # reuse the alias with an empty topic
        pub.publish("", b"aliased", qos=1, properties=props(
            PacketTypes.PUBLISH, TopicAlias=1)).wait_for_publish(WAIT)
    else:
        pub.publish("gov/c/x", b"again", qos=1).wait_for_publish(WAIT)
    _wait(events["all_messages"], "delivered messages")

    pub._send_pingreq()  # paho only pings on keepalive; trigger one now
    _wait(events["pingresp"], "PINGRESP")
    sub.unsubscribe(["gov/#", "gov/+/x"])
    _wait(events["unsubscribed"], "UNSUBACK")

    if v5:
        pub.disconnect(reasoncode=PahoReasonCode(PacketTypes.DISCONNECT, identifier=4))
        sub.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    else:
        pub.disconnect()
        sub.disconnect()
    pub.loop_stop()
    sub.loop_stop()


def _mosquitto_pub(port: int, v5: bool) -> None:
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "gov/cli", "-m", "hi",
           "-q", "2", "-i", "capture-cli-" + ("v5" if v5 else "v311")]
    if v5:
        cmd += ["-V", "mqttv5", "-D", "publish", "user-property", "k", "v",
                "-D", "connect", "session-expiry-interval", "30"]
    else:
        cmd += ["-V", "mqttv311"]
    subprocess.run(cmd, check=True, timeout=WAIT)


def _frames(stream: bytes) -> list[str]:
    from appliance.mqtt import NEED_DATA, FrameReader

    reader = FrameReader()
    reader.feed(bytes(stream))
    frames = []
    while (frame := reader.next_frame()) is not NEED_DATA:
        frames.append(frame.raw.hex())  # type: ignore[union-attr]
    assert not reader.buffered, "recording ends in the middle of a packet"
    return frames


def capture() -> dict[str, object]:
    """Run every scenario against a fresh broker; return the fixture document."""
    import paho.mqtt

    broker = Broker()
    relay = Relay(broker.port)
    sessions = []
    try:
        for v5 in (False, True):
            version = 5 if v5 else 4
            # Each scenario's connections: a subscriber and a publisher, then one mosquitto_pub.
            scenario = [("paho", _paho_session, 2), ("mosquitto_pub", _mosquitto_pub, 1)]
            for peer, run, connections in scenario:
                first = len(relay.recordings)
                run(relay.port, v5)
                with relay.accepted:
                    # The relay's accept thread records a connection just after it starts relaying
                    # it: on a busy machine that can come after the scenario has finished.
                    if not relay.accepted.wait_for(lambda: len(relay.recordings) >= first + connections, WAIT):
                        raise TimeoutError(f"the relay recorded {len(relay.recordings) - first} of {connections} connections")
                    new = relay.recordings[first:]
                for i, recording in enumerate(new):
                    _wait(recording.done, "connection close")
                    sessions.append({
                        "name": f"{peer}-{'v5' if v5 else 'v311'}-{i}",
                        "version": version,
                        "client_to_server": _frames(recording.client_to_server),
                        "server_to_client": _frames(recording.server_to_client),
                    })
    finally:
        relay.close()
        broker.close()
    mosquitto_version = subprocess.run(
        [MOSQUITTO, "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"comment": "Recorded by tests/mqtt/mqtt_capture.py (relay between clients and mosquitto)",
            "paho": paho.mqtt.__version__, "mosquitto": mosquitto_version, "sessions": sessions}


if __name__ == "__main__":
    document = capture()
    FIXTURE.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {sum(len(s['client_to_server']) + len(s['server_to_client']) for s in document['sessions'])} packets to {FIXTURE}", file=sys.stderr)
