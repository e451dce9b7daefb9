"""The `console:` config section: where the web console listens, with what TLS, and who may act.

Users log in with the appliance's password file (`auth.password_file`); this section only says
which of them are operators (may release, purge, reload and run schema trials) and which are viewers (may
look). A user in neither list cannot log in.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from appliance.config.base import Address, ListenerTLSConfig, Seconds, _address, _Section


class ConsoleConfig(_Section):
    listen: Address = Field(
        Address(host="127.0.0.1", port=8080),
        description="HOST:PORT the web console serves on (`appliance console --listen` overrides it). A "
        "non-loopback address needs tls and at least one user in operators or viewers.",
    )
    tls: ListenerTLSConfig | None = Field(
        None, description="Serve the console over HTTPS with these settings (the same keys as a listener's tls, "
        "except use_identity_as_username).",
    )
    operators: list[str] = Field(
        default_factory=list,
        description="Users of auth.password_file who may act in the console: release and purge quarantined "
        "messages, reload the appliance, run schema trials.",
    )
    viewers: list[str] = Field(
        default_factory=list, description="Users of auth.password_file who may only look (every page, no actions).",
    )
    session_idle: Seconds = Field(
        8 * 3600.0, gt=0, description="A console session ends after this long without a request (e.g. 8h).",
    )
    login_attempts: int = Field(
        5, ge=1, description="Failed logins allowed per user and per client address within login_window; "
        "more are refused until the window has passed.",
    )
    login_window: Seconds = Field(300.0, gt=0, description="The window of login_attempts (e.g. 5m).")
    trial_roots: list[Path] = Field(
        default_factory=list,
        description="Directories under which a schema trial may name a candidate schema set directory "
        "(always allowed: the directory holding the schema set in force).",
    )

    _listen = field_validator("listen", mode="before")(_address)

    @field_validator("tls")
    @classmethod
    def _no_identity_as_username(cls, tls: ListenerTLSConfig | None) -> ListenerTLSConfig | None:
        if tls is not None and tls.use_identity_as_username != "none":
            raise ValueError("console.tls.use_identity_as_username is not supported: the console authenticates "
                             "with its password file")
        return tls

    @model_validator(mode="after")
    def _roles_are_distinct(self) -> ConsoleConfig:
        both = sorted(set(self.operators) & set(self.viewers))
        if both:
            raise ValueError(f"console: users listed both as operators and viewers: {', '.join(both)}")
        return self
