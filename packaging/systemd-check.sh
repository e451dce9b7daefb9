#!/usr/bin/env bash
# Inside a booted root filesystem with the package installed (packaging/test-systemd.sh): the unit
# under a real systemd, with a TLS listener whose key comes from a systemd credential. Writes its
# verdict to /var/tmp/systemd-result (PASS or FAIL: why) and powers the machine off.
#   systemd-check.sh PORT TLS_PORT METRICS_PORT [emulated]
# emulated: under qemu-user systemd cannot set up credentials; the caller reset LoadCredential= with a
# drop-in, and the TLS listener (whose key is a credential) is left out.
set -uo pipefail
port=$1 tls_port=$2 mport=$3 emulated=${4:-}
result=/var/tmp/systemd-result
conf=/etc/mqtt-appliance/appliance.yaml
fail() { echo "FAIL: $*" >"$result"; journalctl -u mqtt-appliance --no-pager -n 40 >>"$result" 2>&1; systemctl poweroff; exit 1; }
step() { echo "== $*" >>/var/tmp/systemd-log; }

step "the packaged config with an empty credentials directory (LoadCredential= of it must not fail)"
sed -i -e "s/^listen: .*/listen: 127.0.0.1:$port/" -e "s/^  listen: [^ ]*/  listen: 127.0.0.1:$mport/" "$conf"
[ -z "$(ls -A /etc/mqtt-appliance/credentials)" ] || fail "credentials directory not empty"
systemctl start mqtt-appliance.service || fail "systemctl start with no credentials"
systemctl stop mqtt-appliance.service || fail "systemctl stop"

if [ -z "$emulated" ]; then
step "a TLS key as a credential, the config naming it"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -keyout /etc/mqtt-appliance/credentials/listener-tls-key -out /etc/mqtt-appliance/listener.pem 2>/dev/null \
  || fail "openssl"
chmod 0600 /etc/mqtt-appliance/credentials/listener-tls-key
cat >>"$conf" <<YAML
listeners:
  - listen: 127.0.0.1:$tls_port
    tls:
      cert_file: /etc/mqtt-appliance/listener.pem
      key_credential: listener-tls-key
YAML
fi

step "systemctl start (Type=notify: returns once the appliance is ready)"
systemctl start mqtt-appliance.service || fail "systemctl start"
systemctl is-active --quiet mqtt-appliance.service || fail "not active after start"
status=$(systemctl show -p StatusText --value mqtt-appliance.service)
case "$status" in "serving MQTT on"*) ;; *) fail "status text: $status" ;; esac
step "$status"

step "publishes over the plain and the TLS listener"
valid='{"device_id":"t1","ts":"2026-12-01T12:00:00Z","temperature":21.5}'
out=$(mosquitto_pub -V mqttv5 -h 127.0.0.1 -p "$port" -q 1 -d -t sensor/t1/temperature -m "$valid" 2>&1)
# Accepted: 0, or 0x10 (16) "no matching subscribers", as nobody subscribes here.
echo "$out" | grep -Eq "received PUBACK \(Mid: 1, RC:(0|16)\)" || fail "plain publish: $out"
if [ -z "$emulated" ]; then
  out=$(mosquitto_pub -V mqttv5 -h localhost -p "$tls_port" --cafile /etc/mqtt-appliance/listener.pem -q 1 -d \
    -t sensor/t1/temperature -m '{"device_id":"t1","temperature":999}' 2>&1)
else
  out=$(mosquitto_pub -V mqttv5 -h 127.0.0.1 -p "$port" -q 1 -d -t sensor/t1/temperature \
    -m '{"device_id":"t1","temperature":999}' 2>&1)
fi
echo "$out" | grep -q "received PUBACK (Mid: 1, RC:153)" || fail "invalid publish: $out"

step "systemctl reload (SIGHUP) and the watchdog"
systemctl reload mqtt-appliance.service || fail "systemctl reload"
systemctl is-active --quiet mqtt-appliance.service || fail "not active after reload"
# systemd 252 returns from a reload once ExecReload= sent SIGHUP (only Type=notify-reload, 253+,
# waits for the service): wait for the appliance to say it reloaded (seconds under emulation).
for _ in $(seq 1 300); do
  journalctl -u mqtt-appliance --no-pager | grep -q "reloaded" && break
  sleep 0.2
done
journalctl -u mqtt-appliance --no-pager | grep -q "reloaded" || fail "no reload in the journal within 60 s"
[ "$(systemctl show -p WatchdogUSec --value mqtt-appliance.service)" = 30s ] || fail "watchdog not set"
sudo_free_status=$(setpriv --reuid=mqtt-appliance --regid=mqtt-appliance --init-groups appliance status 2>&1) \
  || fail "appliance status: $sudo_free_status"
security=$(systemd-analyze security mqtt-appliance.service 2>/dev/null | tail -1)
step "$security"

step "the seal helper under the unit's hardening: a purge seals the active segment, the service converts it to Parquet"
as_service() { setpriv --reuid=mqtt-appliance --regid=mqtt-appliance --init-groups "$@"; }
out=$(as_service appliance quarantine purge --all --yes 2>&1) || fail "quarantine purge: $out"
echo "$out" | grep -q "purged 1 message" || fail "quarantine purge: $out"
# The purge sealed the active segment; the service's seal helper converts it in the background.
for _ in $(seq 1 300); do
  ls /var/lib/mqtt-appliance/audit/parquet/decisions/day=*/*.parquet >/dev/null 2>&1 && break
  sleep 0.2
done
ls /var/lib/mqtt-appliance/audit/parquet/decisions/day=*/*.parquet >/dev/null 2>&1 \
  || fail "no Parquet file within 60 s of the seal: $(find /var/lib/mqtt-appliance/audit /var/lib/mqtt-appliance/log | head -20)"
out=$(as_service appliance audit sql --format csv \
  "SELECT verdict, count(*) AS n, count(payload) AS kept FROM decisions GROUP BY verdict ORDER BY verdict" 2>&1) \
  || fail "audit sql: $out"
# The accepted payload is kept (record_payloads), the purged one is gone.
echo "$out" | grep -q "^accept,1,1$" && echo "$out" | grep -q "^reject,1,0$" || fail "audit after the purge: $out"
journalctl -u mqtt-appliance --no-pager | grep -Ei "seal.*(fail|error)|helper.*(fail|error)" \
  && fail "the seal helper failed under the unit"
step "sealed and purged under the unit: $(echo "$out" | tr '\n' ' ')"

step "upgrade while running: the package stops the service and starts it again"
if [ -e /var/tmp/newer.deb ]; then
  before_pid=$(systemctl show -p MainPID --value mqtt-appliance.service)
  before_conf=$(md5sum <"$conf")
  dpkg -i /var/tmp/newer.deb >>/var/tmp/systemd-log 2>&1 || fail "dpkg -i of the newer package"
  systemctl is-active --quiet mqtt-appliance.service || fail "not running again after the upgrade"
  after_pid=$(systemctl show -p MainPID --value mqtt-appliance.service)
  [ "$after_pid" != "$before_pid" ] || fail "the service was not restarted by the upgrade"
  [ "$(md5sum <"$conf")" = "$before_conf" ] || fail "the upgrade changed the config"
  [ -n "$emulated" ] || [ -s /etc/mqtt-appliance/credentials/listener-tls-key ] || fail "the upgrade lost the credential"
  step "upgraded to $(dpkg-query -W -f '${Version}' mqtt-appliance), running again (pid $before_pid -> $after_pid)"
fi

step "systemctl stop"
systemctl stop mqtt-appliance.service || fail "systemctl stop"
[ "$(systemctl show -p Result --value mqtt-appliance.service)" = success ] || fail "stop result: $(systemctl show -p Result --value mqtt-appliance.service)"
journalctl -u mqtt-appliance --no-pager | grep -q "stopped" || fail "no clean stop in the journal"
pgrep -u mqtt-appliance >/dev/null && fail "processes of mqtt-appliance left: $(pgrep -a -u mqtt-appliance)"
echo "PASS: $status; $security" >"$result"
systemctl poweroff
