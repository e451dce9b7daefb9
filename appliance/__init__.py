"""MQTT schema governance appliance.

A proxy in front of an embedded (or external) mosquitto: LAN clients connect to the appliance,
every PUBLISH passes a governance pipeline before the broker sees it, and broker traffic flows
back to the clients packet by packet. See docs/architecture.md.
"""

__version__ = "0.1.0"
