"""Hand-assembled golden packets: (name, version, wire hex, packet).

The hex was written from the MQTT 3.1.1 and 5.0 specifications, not produced
by our encoder; captured traffic from real peers lives in
fixtures/packets/captured.json.
"""

from __future__ import annotations

from appliance.mqtt import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, PropertyId as P,
    ProtocolVersion, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription,
    Unsuback, Unsubscribe, Will,
)

V3, V311, V5 = ProtocolVersion.MQTT_3_1, ProtocolVersion.MQTT_3_1_1, ProtocolVersion.MQTT_5

GOLDEN = [
    # --- MQTT 3.1 / 3.1.1 -------------------------------------------------------------------
    ("connect-3.1", V311, "10110006 4d5149736470 03 02 003c 0003616263",
     Connect("abc", V3)),
    ("connect-minimal", V311, "100f 00044d515454 04 02 003c 0003616263",
     Connect("abc")),
    ("connect-full", V311,
     "101b 00044d515454 04 ec 000a 000163 000177 0003627965 000175 000170",
     Connect("c", clean_start=False, keepalive=10, username="u", password=b"p",
             will=Will("w", b"bye", qos=1, retain=True))),
    ("connack-session-present", V311, "2002 0100", Connack(session_present=True)),
    ("connack-refused", V311, "2002 0005", Connack(reason_code=5)),
    ("publish-qos0", V311, "3007 0003612f62 6869", Publish("a/b", b"hi")),
    ("publish-qos1-retain-dup", V311, "3b09 0003612f62 000a 6869",
     Publish("a/b", b"hi", qos=1, retain=True, dup=True, packet_id=10)),
    ("publish-qos2-empty-payload", V311, "3405 000174 1234",
     Publish("t", qos=2, packet_id=0x1234)),
    ("publish-2-byte-length", V311, "30cb01 000174" + "78" * 200, Publish("t", b"x" * 200)),
    ("puback", V311, "4002 0001", Puback(1)),
    ("pubrec", V311, "5002 0002", Pubrec(2)),
    ("pubrel", V311, "6202 0003", Pubrel(3)),
    ("pubcomp", V311, "7002 0004", Pubcomp(4)),
    ("subscribe", V311, "820e 0005 0003612f23 01 00032b2f62 02",
     Subscribe(5, (Subscription("a/#", 1), Subscription("+/b", 2)))),
    ("suback", V311, "9005 0005 010280", Suback(5, (1, 2, 0x80))),
    ("unsubscribe", V311, "a207 0006 0003612f23", Unsubscribe(6, ("a/#",))),
    ("unsuback", V311, "b002 0006", Unsuback(6)),
    ("pingreq", V311, "c000", Pingreq()),
    ("pingresp", V311, "d000", Pingresp()),
    ("disconnect", V311, "e000", Disconnect()),
    # --- MQTT 5 -----------------------------------------------------------------------------
    ("v5-connect-minimal", V5, "1010 00044d515454 05 02 003c 00 0003616263",
     Connect("abc", V5)),
    ("v5-connect-full", V5,
     "1030 00044d515454 05 56 001e"
     " 0f 110000003c 210014 2600016b000176"
     " 000163"
     " 09 1800000005 03000174"
     " 000177 0000 00027077",
     Connect("c", V5, keepalive=30, password=b"pw",
             properties=Properties(((P.SESSION_EXPIRY_INTERVAL, 60), (P.RECEIVE_MAXIMUM, 20),
                                    (P.USER_PROPERTY, ("k", "v")))),
             will=Will("w", b"", qos=2, properties=Properties(
                 ((P.WILL_DELAY_INTERVAL, 5), (P.CONTENT_TYPE, "t")))))),
    ("v5-connack", V5, "2003 0000 00", Connack()),
    ("v5-connack-props", V5, "200d 0100 0a 1200026964 22000a 2401",
     Connack(True, 0, Properties(((P.ASSIGNED_CLIENT_IDENTIFIER, "id"),
                                  (P.TOPIC_ALIAS_MAXIMUM, 10), (P.MAXIMUM_QOS, 1))))),
    ("v5-connack-refused", V5, "2003 0087 00", Connack(reason_code=0x87)),
    ("v5-publish-qos0", V5, "3008 0003612f62 00 6869", Publish("a/b", b"hi")),
    ("v5-publish-props", V5,
     "3226 000161 0001 1f 0101 020000000a 0900020102 26000161000131 26000161000132 0b8101 0b02 78",
     Publish("a", b"x", qos=1, packet_id=1, properties=Properties((
         (P.PAYLOAD_FORMAT_INDICATOR, 1), (P.MESSAGE_EXPIRY_INTERVAL, 10),
         (P.CORRELATION_DATA, b"\x01\x02"), (P.USER_PROPERTY, ("a", "1")),
         (P.USER_PROPERTY, ("a", "2")), (P.SUBSCRIPTION_IDENTIFIER, 129),
         (P.SUBSCRIPTION_IDENTIFIER, 2))))),
    ("v5-publish-topic-alias", V5, "3007 0000 03230003 7a",
     Publish("", b"z", properties=Properties(((P.TOPIC_ALIAS, 3),)))),
    ("v5-puback", V5, "4002 0001", Puback(1)),
    ("v5-puback-code", V5, "4003 0001 10", Puback(1, 0x10)),
    ("v5-puback-props", V5, "400a 0001 80 06 1f0003626164",
     Puback(1, 0x80, Properties(((P.REASON_STRING, "bad"),)))),
    ("v5-pubrec", V5, "5003 0002 80", Pubrec(2, 0x80)),
    ("v5-pubrel", V5, "6203 0003 92", Pubrel(3, 0x92)),
    ("v5-pubcomp", V5, "7002 0004", Pubcomp(4)),
    ("v5-subscribe", V5,
     "821a 000a 02 0b05 0003612f2b 2d 000c247368617265 2f672f782f23 02",
     Subscribe(10, (Subscription("a/+", 1, no_local=True, retain_as_published=True,
                                 retain_handling=2),
                    Subscription("$share/g/x/#", 2)),
               Properties(((P.SUBSCRIPTION_IDENTIFIER, 5),)))),
    ("v5-suback", V5, "9006 000a 00 01028f", Suback(10, (1, 2, 0x8F))),
    ("v5-suback-props", V5, "9008 000a 04 1f000165 80",
     Suback(10, (0x80,), Properties(((P.REASON_STRING, "e"),)))),
    ("v5-unsubscribe", V5, "a208 000b 00 0003612f23", Unsubscribe(11, ("a/#",))),
    ("v5-unsuback", V5, "b005 000b 00 0011", Unsuback(11, (0, 0x11))),
    ("v5-pingreq", V5, "c000", Pingreq()),
    ("v5-pingresp", V5, "d000", Pingresp()),
    ("v5-disconnect", V5, "e000", Disconnect()),
    ("v5-disconnect-with-will", V5, "e001 04", Disconnect(4)),
    ("v5-disconnect-props", V5, "e007 8b 05 1100000000",
     Disconnect(0x8B, Properties(((P.SESSION_EXPIRY_INTERVAL, 0),)))),
    ("v5-auth", V5, "f000", Auth()),
    ("v5-auth-continue", V5, "f001 18", Auth(0x18)),
    ("v5-auth-props", V5, "f00c 18 0a 1500036162631600 01ff",
     Auth(0x18, Properties(((P.AUTHENTICATION_METHOD, "abc"), (P.AUTHENTICATION_DATA, b"\xff"))))),
]


def golden_bytes(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text.replace(" ", ""))
