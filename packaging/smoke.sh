#!/usr/bin/env bash
# Smoke test of an installed mqtt-appliance package, as root on the machine (or root filesystem) it
# was installed on; `make test-arm64` runs it in the emulated arm64 one. Uses only what the package
# and its dependencies bring (mosquitto-clients for the publishes).
#   APPLIANCE_TIMEOUT_SCALE  multiplies every wait (emulation is ~5-10x slower)
set -euo pipefail
scale=${APPLIANCE_TIMEOUT_SCALE:-1}
conf=/etc/mqtt-appliance/appliance.yaml
unit=/usr/lib/systemd/system/mqtt-appliance.service
py=/opt/mqtt-appliance/venv/bin/python3
log=/var/tmp/appliance-smoke.log
start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }
fail() { echo "SMOKE FAILED: $*" >&2; [ -f "$log" ] && tail -30 "$log" >&2; exit 1; }
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit=$(( $1 * scale )) what=$2; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "no $what within ${limit}s"
    sleep 0.2
  done
}
# As the unit's user, with no process in between (signals reach the command itself), and without
# the container's $NOTIFY_SOCKET (systemd-nspawn sets one that only root may use).
user=$(sed -n 's/^User=//p' "$unit")
as_user=(setpriv --reuid="$user" --regid="$user" --init-groups env -u NOTIFY_SOCKET HOME=/var/lib/mqtt-appliance)
as_service() { "${as_user[@]}" "$@"; }

step "the operator's edit of the conffile: free loopback ports for this test"
port=$(free_port) mport=$(free_port)
sed -i -e "s/^listen: .*/listen: 127.0.0.1:$port/" -e "s/^  listen: [^ ]*/  listen: 127.0.0.1:$mport/" "$conf"
grep -q "^listen: 127.0.0.1:$port" "$conf" && grep -q "listen: 127.0.0.1:$mport" "$conf" || fail "could not edit $conf"

step "the installed docs: every image console.md shows is there"
docs=/usr/share/doc/mqtt-appliance
images=$(grep -o '](console/[^)]*\.png)' "$docs/console.md" | sed 's/^](//; s/)$//')
[ -n "$images" ] || fail "console.md shows no screenshot"
for image in $images; do [ -s "$docs/$image" ] || fail "$docs/$image is missing"; done
# audit.md once: a link to the console's package-data copy (its SQL cookbook), which must resolve.
[ -L "$docs/audit.md" ] && [ -s "$docs/audit.md" ] || fail "$docs/audit.md is not a working link to the console's copy"
[ "$(find /opt/mqtt-appliance /usr/share/doc/mqtt-appliance -name audit.md -type f | wc -l)" = 1 ] \
  || fail "audit.md is installed more than once"
/opt/mqtt-appliance/venv/bin/python3 -c 'from appliance.console import cookbook; assert cookbook.queries()' \
  || fail "the console's cookbook is empty"

step "appliance check on the demo schema set"
appliance check --config "$conf" | tee /dev/stderr | grep -q "schema set v1 (/etc/mqtt-appliance/schemas): ok" \
  || fail "appliance check"

step "the service, from the unit's command line, as the unit's user"
read -r -a command <<<"$(sed -n 's/^ExecStart=//p' "$unit")"
[ -x "${command[0]}" ] || fail "ExecStart ${command[0]} is not executable"
systemd-tmpfiles --create /usr/lib/tmpfiles.d/mqtt-appliance.conf  # what StateDirectory= does at start
"${as_user[@]}" "${command[@]}" >"$log" 2>&1 &  # a simple command: $! is the service itself
pid=$!
ready() { kill -0 "$pid" && "$py" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$mport/readyz', timeout=5)"; }
wait_for 60 "ready service (/readyz)" ready
"$py" - "$mport" <<'PY' || fail "metrics"
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
build = next(line for line in text.splitlines() if line.startswith("mqtt_proxy_build_info{"))
print(build)
assert "process_resident_memory_bytes" in text
PY
echo "RSS before the first message (under qemu-user: the emulator's): $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"

step "one valid and one invalid MQTT 5 publish, QoS 1: the PUBACK reason codes"
sub=/var/tmp/smoke-sub.txt
mosquitto_sub -V mqttv5 -h 127.0.0.1 -p "$port" -t 'sensor/#' -C 1 -W $(( 60 * scale )) >"$sub" 2>&1 &
subpid=$!
sleep 1  # the subscription must be in place before the publish; there is no event to wait for here
device=smoke$(date +%s)  # this run's own topic, so that a rerun on the same state counts only its messages
valid="{\"device_id\":\"$device\",\"ts\":\"2026-12-01T12:00:00Z\",\"temperature\":21.5}"
out=$(mosquitto_pub -V mqttv5 -h 127.0.0.1 -p "$port" -q 1 -d -t "sensor/$device/temperature" -m "$valid" 2>&1)
echo "$out" | grep -E "PUBACK" || true
echo "$out" | grep -q "received PUBACK (Mid: 1, RC:0)" || fail "valid publish not acknowledged with 0: $out"
out=$(mosquitto_pub -V mqttv5 -h 127.0.0.1 -p "$port" -q 1 -d -t "sensor/$device/temperature" \
  -m "{\"device_id\":\"$device\",\"temperature\":999}" 2>&1)
echo "$out" | grep -E "PUBACK" || true
echo "$out" | grep -q "received PUBACK (Mid: 1, RC:153)" || fail "invalid publish not refused with 0x99 (153): $out"
wait "$subpid" || fail "the subscriber got nothing: $(cat "$sub")"
[ "$(cat "$sub")" = "$valid" ] || fail "the subscriber got $(cat "$sub"), not the valid message"
echo "delivered: $(cat "$sub")"

step "appliance audit sql (through the running service)"
audit=$(as_service appliance audit sql --config "$conf" --format csv \
  "SELECT verdict, count(*) AS n FROM decisions WHERE topic = 'sensor/$device/temperature' GROUP BY verdict ORDER BY verdict")
echo "$audit"
echo "$audit" | grep -q "^accept,1" && echo "$audit" | grep -q "^reject,1" || fail "audit log: $audit"

step "replay --against schemas/v2"
set +e
replayed=$(as_service replay --against /usr/share/mqtt-appliance/schemas/v2 --config "$conf" 2>&1)
code=$?
set -e
echo "$replayed" | tail -3
# v2 requires a unit: the accepted reading would be newly rejected.
[ "$code" = 1 ] && echo "$replayed" | grep -q "BREAKING: .* would be newly rejected by v2" || fail "replay (exit $code): $replayed"

step "the web console, from its unit's command line, as the unit's user (read-only: the demo lists no users)"
console_unit=/usr/lib/systemd/system/mqtt-appliance-console.service
read -r -a console_command <<<"$(sed -n 's/^ExecStart=//p' "$console_unit")"
cport=$(free_port)
"${as_user[@]}" "${console_command[@]}" --listen "127.0.0.1:$cport" >>"$log" 2>&1 &
cpid=$!
console_up() { kill -0 "$cpid" && "$py" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$cport/', timeout=5)"; }
wait_for 60 "the console (http://127.0.0.1:$cport/)" console_up
"$py" - "$cport" "$device" <<'PY' || fail "console pages"
import sys, urllib.parse, urllib.request
base, device = f"http://127.0.0.1:{sys.argv[1]}", sys.argv[2]
def get(path):
    return urllib.request.urlopen(base + path, timeout=60).read().decode()
assert 'data-field="service"' in get("/")
assert "htmx" in get("/static/vendor/htmx-2.0.11.min.js")[:2000]
page = get("/sql?q=" + urllib.parse.quote(f"SELECT verdict FROM decisions WHERE topic = 'sensor/{device}/temperature' ORDER BY verdict"))
assert "<td>accept</td>" in page and "<td>reject</td>" in page, page[-2000:]
print("console pages: ok")
PY
kill -TERM "$cpid"
# uvicorn stops gracefully, then ends by the signal it caught (143): what systemd counts as clean.
set +e; wait "$cpid"; code=$?; set -e
[ "$code" = 0 ] || [ "$code" = 143 ] || fail "the console exited with $code on SIGTERM"

step "clean stop (SIGTERM)"
children=$(pgrep -P "$pid" || true)
kill -TERM "$pid"
wait "$pid" || fail "the service exited with $? on SIGTERM"
for child in $children; do
  ! kill -0 "$child" 2>/dev/null || fail "child $child ($(cat /proc/$child/comm)) still running"
done
grep -q "stopped" "$log" || fail "no 'stopped' in the log"
step "smoke test passed"
