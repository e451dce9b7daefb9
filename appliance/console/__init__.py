"""The web console (`appliance console`): a process of its own that asks the running appliance for
live state and actions over the admin socket and reads the audit store itself (docs/console.md)."""
